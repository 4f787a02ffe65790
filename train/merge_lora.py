"""Merge LoRA adapters into their base model: a plain checkpoint with W + (alpha / r) A B in
place of each adapted weight, for anything that takes a checkpoint (generate, convert.to_torch,
another fine-tuning run).

    python -m train.merge_lora base/ run/adapters merged/
"""

from __future__ import annotations

import sys

from mistral_jax import cli


def arguments():
    p = cli.parser("python -m train.merge_lora", __doc__)
    p.add_argument("base", help="the checkpoint the adapters were trained on (--init)")
    p.add_argument("adapters", help="the adapters directory (train.finetune's OUT/adapters)")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv=None) -> int:
    return cli.entry(arguments(), merge, argv)  # (OUT refused before any work if it exists)


def merge(args) -> None:
    import mistral_jax

    model = mistral_jax.load(args.base, adapters=args.adapters)
    print(f"wrote {mistral_jax.save(model, args.out, overwrite=args.overwrite)}")


if __name__ == "__main__":
    sys.exit(main())
