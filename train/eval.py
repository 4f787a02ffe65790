"""Loss, perplexity and token count of a checkpoint on text / JSONL files: the numbers the
fine-tuning run's eval prints, on the same tokenization and packing.

    python -m train.eval ckpt/ --data val.jsonl
    python -m train.eval base/ --data val.jsonl --adapters run/adapters --mesh 1x8

On a run's OUT/final, or with --adapters OUT/adapters, the settings that change the loss
(--seq-len, --dtype, --isolate-documents, --loss-on) default to the run's own, from
OUT/run.json; a flag given on the command line wins. The run's eval counts at most its
--eval-batches batches; this counts every row of --data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mistral_jax import cli
from mistral_jax.parallel import devices

# What --seq-len, --dtype, --isolate-documents and --loss-on are when neither the command line
# nor the run that wrote the checkpoint or adapters says (train.finetune's own defaults).
DEFAULTS = {"seq_len": 256, "dtype": "float32", "isolate_documents": True, "loss_on": "assistant"}
RUN_FILE = "run.json"  # train.run.loop.RUN_FILE: what a run records beside final/, adapters/
RUN_OUTPUTS = ("final", "adapters")  # train.run.loop's FINAL and ADAPTERS


def run_settings(args) -> tuple[dict, str | None]:
    """The settings in DEFAULTS for this evaluation, and a note naming those taken from the run
    (None when none were): a flag given wins, then the run that wrote --adapters (or else
    CKPT), recorded in its OUT/run.json, then DEFAULTS."""
    record, source = {}, None
    for path in (args.adapters, args.ckpt):
        if path is None:
            continue
        path = Path(path).absolute()
        if path.name in RUN_OUTPUTS and (path.parent / RUN_FILE).is_file():
            source = path.parent / RUN_FILE
            try:
                record = json.loads(source.read_text())
            except ValueError as e:
                raise ValueError(f"{source}: not JSON ({e}); give --seq-len, --dtype and "
                                 "--isolate-documents on the command line") from None
            break
    settings, taken = dict(DEFAULTS), []
    for name in DEFAULTS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
        elif name in record:
            settings[name] = record[name]
            flag = name.replace("_", "-")
            taken.append(f"--{flag} {record[name]}" if name != "isolate_documents" else
                         f"--{'' if record[name] else 'no-'}{flag}")
    if not taken:
        return settings, None
    return settings, (f"{', '.join(taken)}: as the run in {source.parent} trained and "
                      "evaluated (a flag given here wins)")


def arguments():
    p = cli.parser("python -m train.eval", __doc__)
    p.add_argument("ckpt", help="checkpoint directory (convert.from_torch or train.finetune "
                   "writes one)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help=".txt files (each "
                   "one document) or .jsonl with {\"text\"}, {\"prompt\", \"completion\"} (the "
                   "completion counted only) or {\"messages\"} (see --loss-on) per line, as "
                   "train.finetune reads them")
    p.add_argument("--adapters", metavar="DIR", help="LoRA adapters directory to apply")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default: "
                   f"the run's, on a fine-tuning run's output; else {DEFAULTS['seq_len']})")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--isolate-documents", action=argparse.BooleanOptionalAction, default=None,
                   help="each document attends only to itself, positions restarting, as "
                   "train.finetune trains by default; --no-isolate-documents: rows attend "
                   "across the documents packed into them (default: the run's, else isolated)")
    p.add_argument("--loss-on", choices=["assistant", "all"], default=None,
                   help="the tokens of a conversation counted: the assistant's turns and their "
                   "end-of-turn tokens, or all (default: the run's, else assistant)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: the run's, else float32)")
    cli.add_mesh(p)
    cli.add_attention(p)
    return p


def main(argv=None) -> int:
    return cli.entry(arguments(), lambda args: report(*evaluate(args)), argv)


def report(loss: float, perplexity: float, tokens: int) -> None:
    print(f"loss {loss:.4f}, perplexity {perplexity:.2f}, {tokens:,} tokens")


def evaluate(args) -> tuple[float, float, int]:
    import jax
    import jax.numpy as jnp

    import mistral_jax
    from mistral_jax.base import trees
    from mistral_jax.base.notes import note, warn
    from mistral_jax.io import lora
    from mistral_jax.io.checkpoint import read_config
    from train.compute import step as S
    from train.input import data as D

    if lora.is_adapters(args.ckpt):
        base = lora.read_info(args.ckpt).get("base") or "BASE"
        raise ValueError(f"{args.ckpt} holds LoRA adapters, not a checkpoint: evaluate them on "
                         f"their base, python -m train.eval {base} --adapters {args.ckpt} ...")
    settings, taken = run_settings(args)
    if taken:
        note(taken)
    seq_len, isolate = settings["seq_len"], settings["isolate_documents"]
    if seq_len < 2 or args.batch_size < 1:
        raise ValueError("--seq-len must be >= 2 and --batch-size >= 1")
    config = read_config(args.ckpt)
    if config.learned_positions is not None and seq_len > config.learned_positions:
        raise ValueError(f"--seq-len {seq_len} is longer than the "
                         f"{config.learned_positions} positions this GPT-2 has learned")
    mesh, chosen = devices.mesh_for(args.mesh, config)
    if chosen:
        note(chosen)
    model = mistral_jax.load(args.ckpt, mesh=mesh, adapters=args.adapters,
                             attention=args.attention)
    if mesh is None:  # the batch still needs a mesh to be placed on: the model's one device
        mesh = mistral_jax.make_mesh("1x1", jax.devices()[:1])
    docs = [d for f in args.data for d in D.read_documents(f)]
    tokenizer = model.tokenizer
    pad = tokenizer.pad_id if tokenizer and tokenizer.pad_id is not None else \
        (tokenizer.eos_id if tokenizer else 0)
    rows = D.pack(D.tokenize(docs, tokenizer, loss_on=settings["loss_on"]), seq_len,
                  pad_id=pad, isolate_documents=isolate)
    for line in D.summary(rows, docs, "the data", isolate_documents=isolate)[1:]:
        warn(line.removeprefix("warning: "))
    dtype = jnp.bfloat16 if settings["dtype"] == "bfloat16" else jnp.float32
    with jax.set_mesh(mesh):
        batch = D.eval_batch(rows, batch_size=args.batch_size,
                             max_batches=-(-len(rows) // args.batch_size), mesh=mesh)
        step = S.make_eval_step(S.causal_lm_loss(model, dtype=dtype,
                                                 assemble=lambda params, _: params,
                                                 isolate_documents=isolate))
        total, count, _ = step(trees.weights(model), {}, batch)
    loss, perplexity = S.mean_loss(total, count)
    return loss, perplexity, int(count)


if __name__ == "__main__":
    sys.exit(main())
