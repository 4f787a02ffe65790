"""Merge LoRA adapters into their base model: a plain checkpoint with W + (alpha / r) A B in
place of each adapted weight, for anything that takes a checkpoint (generate, convert.to_torch,
another fine-tuning run).

    python -m train.merge_lora base/ run/adapters merged/

The base must be a float checkpoint. An int8 one is refused: W + (alpha / r) A B requantized to
int8 would round away most of what a short run changes; adapters trained over an int8 base
(QLoRA) merge into the float checkpoint it came from (the message names it when the run
quantized it with --quantize-base), or run unmerged beside the int8 base (--adapters DIR).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mistral_jax import cli


def arguments():
    p = cli.parser("python -m train.merge_lora", __doc__)
    p.add_argument("base", help="the float checkpoint the adapters were trained on (--init), "
                   "or the float one an int8 --init was converted from")
    p.add_argument("adapters", help="the adapters directory (train.finetune's OUT/adapters)")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv=None) -> int:
    return cli.entry(arguments(), merge, argv)  # (OUT refused before any work if it exists)


def merge(args) -> None:
    import mistral_jax
    from mistral_jax.io import checkpoint

    if checkpoint.is_quantized(args.base):
        raise ValueError(f"{args.base} holds int8 weights, and adapters merge into float ones "
                         "(requantized, the sum would lose most of the adapters' change): "
                         f"{float_base(args)}, or keep them apart: --adapters {args.adapters} "
                         f"on generate, eval or serve applies them to {args.base} unmerged")
    model = mistral_jax.load(args.base, adapters=args.adapters)
    print(f"wrote {mistral_jax.save(model, args.out, overwrite=args.overwrite)}")


def float_base(args) -> str:
    """The merge to run instead of one into an int8 base."""
    from mistral_jax.io import checkpoint, lora

    base = lora.read_info(args.adapters).get("base")
    if base and Path(base).is_dir() and not checkpoint.is_quantized(base):
        return f"python -m train.merge_lora {base} {args.adapters} {args.out}"
    return (f"merge into the float checkpoint {args.base} was converted from, python -m "
            f"train.merge_lora FLOAT {args.adapters} {args.out}")


if __name__ == "__main__":
    sys.exit(main())
