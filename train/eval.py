"""Loss, perplexity and token count of a checkpoint on text / JSONL files: the numbers the
fine-tuning run's eval prints, on the same tokenization and packing.

    python -m train.eval ckpt/ --data val.jsonl
    python -m train.eval base/ --data val.jsonl --adapters run/adapters --mesh 1x8
"""

from __future__ import annotations

import argparse
import sys

from mistral_jax import cli, devices


def arguments():
    p = cli.parser("python -m train.eval", __doc__)
    p.add_argument("ckpt", help="checkpoint directory (convert.from_torch or train.finetune "
                   "writes one)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help=".txt files (each "
                   "one document) or .jsonl with {\"text\"} or {\"prompt\", \"completion\"} per "
                   "line (the completion counted only), as train.finetune reads them")
    p.add_argument("--adapters", metavar="DIR", help="LoRA adapters directory to apply")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed row")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--isolate-documents", action=argparse.BooleanOptionalAction, default=True,
                   help="each document attends only to itself, positions restarting, as "
                   "train.finetune trains by default; --no-isolate-documents: rows attend "
                   "across the documents packed into them")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype")
    cli.add_mesh(p)
    cli.add_attention(p)
    return p


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    devices.prepare(args.mesh)  # before JAX starts
    return cli.run(lambda: report(*evaluate(args)))


def report(loss: float, perplexity: float, tokens: int) -> None:
    print(f"loss {loss:.4f}, perplexity {perplexity:.2f}, {tokens:,} tokens")


def evaluate(args) -> tuple[float, float, int]:
    import jax
    import jax.numpy as jnp

    import mistral_jax
    from mistral_jax import trees
    from mistral_jax.checkpoint import read_config
    from mistral_jax.notes import note
    from train import data as D
    from train import step as S

    if args.seq_len < 2 or args.batch_size < 1:
        raise ValueError("--seq-len must be >= 2 and --batch-size >= 1")
    config = read_config(args.ckpt)
    if config.learned_positions is not None and args.seq_len > config.learned_positions:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the "
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
    rows = D.pack(D.tokenize(docs, tokenizer), args.seq_len, pad_id=pad,
                  isolate_documents=args.isolate_documents)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    with jax.set_mesh(mesh):
        batch = D.eval_batch(rows, batch_size=args.batch_size,
                             max_batches=-(-len(rows) // args.batch_size), mesh=mesh)
        step = S.make_eval_step(model, dtype=dtype, assemble=lambda params, _: params,
                                isolate_documents=args.isolate_documents)
        total, count = step(trees.weights(model), {}, batch)
    loss, perplexity = S.mean_loss(total, count)
    return loss, perplexity, int(count)


if __name__ == "__main__":
    sys.exit(main())
