"""Fine-tune a checkpoint as a causal language model on a ("data", "model") device mesh.

    python -m train.finetune --mesh 1x8                      # the embedded default run
    python -m train.finetune --mesh 2x4 --init ckpt/ --data train.jsonl --out run/
    python -m train.finetune --mesh 2x4 --init ckpt/ --data train.jsonl --out run/ --resume

With no --init and no --data it trains a small Mistral on The Devil's Dictionary (shipped in
train/corpus) for a few minutes. OUT receives checkpoints/ (Orbax, for --resume), metrics.jsonl,
loss.png and, at the end, final/ (a checkpoint `python -m mistral_jax.generate` loads).
On a CPU, --mesh auto is the one real CPU device; a mesh of more devices than there are is
made of fake CPU devices (XLA_FLAGS), which show tensor parallelism but run slower.
Multi-host: start one process per host with --coordinator, --num-processes and --process-id.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from train.run.errors import UsageError


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--mesh", default="auto", metavar="DxT|auto", help="device mesh DxT: D-way data "
        "parallel x T-way tensor (Megatron) parallel over D*T devices; T must divide the "
        "attention heads, D the micro-batch. On a CPU, a mesh of more than one device is made "
        "of fake CPU devices, which share the cores and run slower than one. auto: on a CPU "
        "the one real device (1x1), elsewhere every device with the largest T that fits the "
        "model (default auto)")
    add("--init", metavar="CKPT", help="checkpoint directory to start from (convert.from_torch "
        "writes one); default: a small random Mistral, the embedded default run")
    add("--data", nargs="+", metavar="FILE", help="training data: .txt files (each one "
        "document) or .jsonl with {\"text\"} or {\"prompt\", \"completion\"} per line (loss on "
        "the completion only); default: the shipped corpus")
    add("--eval-data", nargs="+", metavar="FILE", help="held-out data, same formats; eval loss "
        "and perplexity every --eval-every steps (default run: held-out dictionary entries)")
    add("--out", help="output directory (default: a new runs/finetune-DATE-TIME; --resume "
        "needs it named)")
    add("--steps", type=positive(int), help="optimizer steps in all (default 1000; default run "
        "120)")
    add("--batch-size", type=positive(int), help="rows of --seq-len tokens per optimizer step, "
        "over all devices (default 8)")
    add("--seq-len", type=positive(int), help="tokens per row; documents are packed into rows "
        "with EOS between them (default 256)")
    add("--lr", type=positive(float), help="peak learning rate of AdamW (default 1e-4; default "
        "run 3e-3)")
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
    add("--isolate-documents", action=argparse.BooleanOptionalAction, default=True,
        help="attention stays within each packed document and positions restart at each one; "
        "--no-isolate-documents lets a row attend across the documents packed into it "
        "(default: isolated)")
    add("--eval-every", type=positive(int), help="evaluate every N steps (default 200; default "
        "run 40)")
    add("--eval-batches", type=positive(int), default=8, help="at most this many batches of "
        "eval data (default 8)")
    add("--save-every", type=positive(int), help="checkpoint every N steps, and at the end "
        "(default 200; default run 40)")
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
        "all weights; only the adapters are trained and checkpointed")
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


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    from train.input import default

    base = default.FLAGS if args.init is None else GENERIC
    for name, value in base.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.warmup is None:
        args.warmup = args.steps // 10
    if args.lora_alpha is None and args.lora_rank:
        args.lora_alpha = 2.0 * args.lora_rank
    args.lora_targets = [t for t in args.lora_targets.split(",") if t]
    if args.out is None and not args.resume and args.num_processes == 1:
        args.out = time.strftime("runs/finetune-%Y%m%d-%H%M%S", time.gmtime())
    return args


def check(args: argparse.Namespace) -> None:
    from mistral_jax.parallel.devices import parse

    shape = parse(args.mesh)
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
    if shape and (shape[0] * shape[1]) % args.num_processes:
        raise UsageError(f"--mesh {args.mesh} ({shape[0] * shape[1]} devices) does not split "
                         f"evenly over {args.num_processes} processes")
    if args.out is None:
        raise UsageError("--resume and multi-process runs need --out (every process must "
                         "name the same directory)")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")


def resume_command(argv: list[str], out: str) -> str:
    """The command line that continues this run: the same flags, --out named, and --resume."""
    argv = list(argv)
    if "--out" not in argv and not any(a.startswith("--out=") for a in argv):
        argv += ["--out", out]
    if "--resume" not in argv:
        argv.append("--resume")
    return "python -m train.finetune " + " ".join(shlex.quote(a) for a in argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from mistral_jax import cli
    from mistral_jax.arch.configs import ConfigError
    from mistral_jax.io.checkpoint import CheckpointError
    from mistral_jax.io.lora import LoraError
    from mistral_jax.parallel.sharding import ShardingError
    from train.input.data import DataError

    errors = (UsageError, DataError, CheckpointError, ConfigError, ShardingError, LoraError,
              FileNotFoundError)
    return cli.entry(parser(), lambda args: start_run(args, argv), argv, errors=errors, code=2)


def start_run(args: argparse.Namespace, argv: list[str]) -> int:
    """The run `args` asks for (`cli.entry` made the devices --mesh asks for); a stop or an
    interruption ends in what to do next and its exit code."""
    import logging

    from mistral_jax.base.notes import LOGGER
    from mistral_jax.parallel import devices
    from train.run.loop import Interrupted, Stopped, run

    try:
        args = with_defaults(args)
        check(args)
        devices.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        import jax

        if jax.process_index() != 0:  # one process speaks for the run
            LOGGER.setLevel(logging.ERROR)
        run(args)
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        if e.step is None:
            print(f"interrupted at step {e.at}: no checkpoint was saved yet", file=sys.stderr)
        else:
            print(f"interrupted at step {e.at}; the last checkpoint is step {e.step} in "
                  f"{e.directory}; continue with:\n  {resume_command(argv, args.out)}",
                  file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before the first step: nothing was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
