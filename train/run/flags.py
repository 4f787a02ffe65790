"""The options of a run, once: the flags of `python -m train.finetune` and `python -m train.dpo`
(the same flags, and DPO's own), their defaults and the checks made before anything starts.
`train.api` takes the same options as keyword arguments through the same parser."""

from __future__ import annotations

import argparse
import math
import shlex
import time

from train.run.errors import UsageError

KINDS = ("finetune", "dpo")


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def unroll_count(text: str) -> int | bool:
    """--unroll: a positive layer count, or 'all' (jax.lax.scan's unroll=True)."""
    if text == "all":
        return True
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of layers or 'all', "
                                         f"got {text!r}")
    return int(text)


class RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors naming the flag, not a usage message and
    an exit: what train.api raises for a bad keyword argument."""

    def error(self, message):
        raise UsageError(message)


def parser(kind: str, doc: str | None, *, raising: bool = False) -> argparse.ArgumentParser:
    """The flags of `python -m train.KIND`; `raising`: errors raise (train.api) rather than
    print the usage and exit 2 (the command line)."""
    dpo = kind == "dpo"
    p = (RaisingParser if raising else argparse.ArgumentParser)(
        prog=f"python -m train.{kind}", description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--mesh", default="auto", metavar="DxT|DxFxT|auto", help="device mesh DxFxT: D-way "
        "data parallel x F-way fully sharded data parallel (FSDP: each replica holds 1/F of "
        "the weights and optimizer state) x T-way tensor (Megatron) parallel over D*F*T "
        "devices; DxT is Dx1xT. T must divide the attention heads, F the hidden size, D*F the "
        "micro-batch. On a CPU, a mesh of more than one device is made "
        "of fake CPU devices, which share the cores and run slower than one. auto: on a CPU "
        "the one real device (1x1), elsewhere every device with the largest T that fits the "
        "model (default auto)")
    if dpo:
        add("--init", metavar="CKPT", help="checkpoint to tune (convert.from_torch or "
            "train.finetune writes one); with full tuning it is also the reference")
        add("--data", nargs="+", metavar="FILE", help="preference pairs: .jsonl with "
            "{\"prompt\", \"chosen\", \"rejected\"} strings per line, or \"prompt\" a list of "
            "messages and each response an assistant message (the chat template renders them)")
        add("--eval-data", nargs="+", metavar="FILE", help="held-out pairs, same format; "
            "eval loss, rewards and accuracy every --eval-every steps")
        add("--beta", type=positive(float), help="strength of the pull towards the reference "
            "(DPO's beta; IPO's tau) (default 0.1)")
        add("--loss", choices=["sigmoid", "ipo"], help="sigmoid: DPO's -log sigmoid(beta "
            "margin); ipo: (margin averaged over tokens - 1/(2 beta))^2 (default sigmoid)")
    else:
        add("--init", metavar="CKPT", help="checkpoint directory to start from "
            "(convert.from_torch writes one); default: a small random Mistral, the embedded "
            "default run")
        add("--data", nargs="+", metavar="FILE", help="training data: .txt files (each one "
            "document) or .jsonl with {\"text\"}, {\"prompt\", \"completion\"} (loss on the "
            "completion only) or {\"messages\": [{\"role\", \"content\"}, ...]} (the "
            "checkpoint's chat template; see --loss-on) per line; default: the shipped corpus")
        add("--eval-data", nargs="+", metavar="FILE", help="held-out data, same formats; eval "
            "loss and perplexity every --eval-every steps (default run: held-out dictionary "
            "entries)")
    add("--out", help=f"output directory (default: a new runs/{kind}-DATE-TIME; --resume "
        "needs it named)")
    add("--steps", type=positive(int), help="optimizer steps in all (default 1000"
        + ("" if dpo else "; default run 120") + ")")
    add("--batch-size", type=positive(int), help=("preference pairs (two rows each)" if dpo
        else "rows of --seq-len tokens") + " per optimizer step, over all devices (default 8)")
    add("--seq-len", type=positive(int), help="most tokens of a prompt and a response; longer "
        "pairs lose the start of the prompt, then the ends of the responses (default 1024)"
        if dpo else "tokens per row; documents end in EOS (or their chat template's end of "
        "turn) and are packed into rows (default 256)")
    add("--lr", type=positive(float), help="peak learning rate of AdamW " + (
        "(default 1e-6, TRL's)" if dpo else "(default 1e-4; default run 3e-3)"))
    add("--warmup", type=int, help="linear warm-up steps before the cosine decay to lr/10 "
        "(default: a tenth of --steps)")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay, not applied to "
        "norms and biases (default 0.1)")
    add("--clip", type=float, default=1.0, help="clip gradients to this global norm; 0 turns "
        "it off (default 1.0)")
    add("--grad-accum", type=positive(int), default=1, help="split each batch into this many "
        "micro-batches whose gradients add up: the same step in less memory (default 1)")
    add("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"],
        help="what the backward pass recomputes instead of storing: none (fastest), full "
        "(least memory: keeps only each layer's input), dots (keeps matmul outputs), "
        "dots_no_batch (keeps weight matmul outputs, recomputes attention)")
    add("--unroll", type=unroll_count, default=1, metavar="N|all",
        help="layers per iteration of the loop over layers, or 'all' for no loop: unrolled "
        "layers compile slower and run faster (no stacked saved values to fill and copy: 3.5%% "
        "a step for the 4-layer default on a CPU) (default 1)")
    from mistral_jax.nn.attention import HELP, IMPLEMENTATIONS

    add("--attention", default="auto", choices=IMPLEMENTATIONS, help=HELP + " (default auto)")
    add("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype; "
        "weights and optimizer state stay float32 (default float32)")
    if not dpo:  # a preference row holds one sequence: nothing to isolate
        add("--isolate-documents", action=argparse.BooleanOptionalAction, default=True,
            help="rows hold whole documents, packed best-fit decreasing (one longer than a row "
            "is cut into pieces); attention stays within each document and positions restart "
            "at each one. --no-isolate-documents makes a row one stream of text: the documents "
            "are concatenated and cut into rows, and attend across each other (default: "
            "isolated; on the default run's data at 256 tokens a row best fit pads 0.38%% of "
            "the tokens and cuts only the 103 documents longer than a row, the stream pads "
            "0.14%% but cuts 359 of the 938 across rows: bench/packing.py)")
        add("--loss-on", default="assistant", choices=["assistant", "all"], help="which tokens "
            "of a {\"messages\": [...]} conversation the loss counts: the assistant's turns and "
            "their end-of-turn tokens, as the chat template marks or renders them, or all "
            "(default assistant)")
    add("--eval-every", type=positive(int), help="evaluate every N steps (default 200"
        + ("" if dpo else "; default run 40") + ")")
    add("--eval-batches", type=positive(int), default=8, help="at most this many batches of "
        "eval data (default 8)")
    add("--save-every", type=positive(int), help="checkpoint every N steps, and at the end "
        "(default 200" + ("" if dpo else "; default run 40") + ")")
    add("--keep", type=positive(int), default=3, help="checkpoints to keep (default 3)")
    add("--resume", action="store_true", help="continue the run in --out from its latest "
        "checkpoint: the same losses as if it had not stopped")
    add("--seed", type=int, default=0, help="seed of the data order, initial weights, LoRA "
        "(default 0)")
    add("--log-every", type=positive(int), default=1, help="write a metrics row every N steps "
        "(default 1)")
    add("--max-bad-steps", type=positive(int), default=5, help="stop after this many steps in a "
        "row with a non-finite loss or gradient (each is skipped; default 5)")
    add("--lora-rank", type=positive(int), help="train LoRA adapters of this rank instead of "
        "all weights; only the adapters are trained and checkpointed" + (
            "; the reference is then the base without them" if dpo else ""))
    add("--lora-targets", default="q,v", help="comma-separated weights LoRA adapts: Mistral "
        "q,k,v,o,gate,up,down; GPT-2 q,k,v,o,fc,proj (default q,v)")
    add("--lora-alpha", type=positive(float), help="LoRA scale numerator: W + alpha/rank * A B "
        "(default 2 * rank)")
    add("--merge-lora", action="store_true", help="with LoRA: also write OUT/final, a plain "
        "checkpoint with the adapters merged into the weights (OUT/adapters is written "
        "either way; python -m train.merge_lora merges them later)")
    add("--quantize-base", choices=["int8"], help="with LoRA: hold the frozen base in int8 "
        "(weight-only, per output channel; QLoRA), a quarter of its float32 bytes, while the "
        "adapters and their gradients stay float32. An int8 --init (convert.from_torch "
        "--quantize int8) is an int8 base without it")
    add("--coordinator", metavar="HOST:PORT", help="multi-host: address of process 0, for "
        "jax.distributed.initialize")
    add("--num-processes", type=positive(int), default=1, help="multi-host: processes in all")
    add("--process-id", type=int, default=0, help="multi-host: this process's index")
    return p


GENERIC = dict(steps=1000, batch_size=8, seq_len=256, lr=1e-4, eval_every=200, save_every=200)
# TRL's DPOConfig defaults for what it shares with these flags (beta, learning rate, length)
DPO = dict(GENERIC, seq_len=1024, lr=1e-6, beta=0.1, loss="sigmoid")


def with_defaults(args: argparse.Namespace, kind: str = "finetune") -> argparse.Namespace:
    from train.input import default

    if kind == "dpo":
        base = DPO
        # not a DPO flag (a row holds one sequence); recorded in OUT/run.json, where train.eval
        # reads how to pack its data for the result: as fine-tuning does by default
        args.isolate_documents = True
    else:
        base = default.FLAGS if args.init is None else GENERIC
    for name, value in base.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.warmup is None:
        args.warmup = args.steps // 10
    if args.lora_alpha is None and args.lora_rank:
        args.lora_alpha = 2.0 * args.lora_rank
    if isinstance(args.lora_targets, str):
        args.lora_targets = [t for t in args.lora_targets.split(",") if t]
    if args.out is None and not args.resume and args.num_processes == 1:
        args.out = time.strftime(f"runs/{kind}-%Y%m%d-%H%M%S", time.gmtime())
    return args


def check(args: argparse.Namespace, kind: str = "finetune") -> None:
    from mistral_jax.parallel.devices import parse

    shape = parse(args.mesh)
    if kind == "dpo" and (args.init is None or not args.data):
        raise UsageError("preference tuning needs --init CKPT (the model to tune, and its "
                         "reference) and --data PAIRS.jsonl")
    if args.merge_lora and not args.lora_rank:
        raise UsageError("--merge-lora needs --lora-rank")
    if args.quantize_base and not args.lora_rank:
        raise UsageError(f"--quantize-base {args.quantize_base} needs --lora-rank: only a "
                         "frozen base can be int8, and full fine-tuning trains every weight")
    if args.lora_rank and args.init is None:
        raise UsageError("--lora-rank needs --init CKPT: adapters adapt a checkpoint (the "
                         "default run starts from random weights that are not saved)")
    if args.num_processes > 1 and not args.coordinator:
        raise UsageError("--num-processes > 1 needs --coordinator HOST:PORT")
    if not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
    if shape and math.prod(shape) % args.num_processes:
        raise UsageError(f"--mesh {args.mesh} ({math.prod(shape)} devices) does not split "
                         f"evenly over {args.num_processes} processes")
    if args.out is None:
        raise UsageError("--resume and multi-process runs need --out (every process must "
                         "name the same directory)")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")


def resume_command(argv: list[str], out: str, kind: str = "finetune") -> str:
    """The command line that continues this run: the same flags, --out named, and --resume."""
    argv = list(argv)
    if "--out" not in argv and not any(a.startswith("--out=") for a in argv):
        argv += ["--out", out]
    if "--resume" not in argv:
        argv.append("--resume")
    return f"python -m train.{kind} " + " ".join(shlex.quote(a) for a in argv)
