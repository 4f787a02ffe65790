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
    args = arguments().parse_args(argv)

    def merge():
        import mistral_jax
        from mistral_jax.io import files

        files.check_new(args.out, args.overwrite)  # before any work
        model = mistral_jax.load(args.base, adapters=args.adapters)
        print(f"wrote {mistral_jax.save(model, args.out, overwrite=args.overwrite)}")

    return cli.run(merge)


if __name__ == "__main__":
    sys.exit(main())
