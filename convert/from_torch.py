"""`python -m convert.from_torch SRC OUT`: a torch-side checkpoint -> a mistral_jax checkpoint.

SRC is a Hugging Face folder (config.json + model.safetensors | sharded safetensors + index |
pytorch_model.bin) or Mistral's original release (params.json + consolidated.*.pth |
consolidated.safetensors); its tokenizer (tokenizer.model, tokenizer.json or GPT-2's
vocab.json + merges.txt) is carried over.

Each format is a module with `detect(path) -> bool` and `plan(path, **options) -> Plan`; a module
with options adds their flags in `add_arguments(parser)`, and the flags the user sets reach its
`plan` as keyword arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from convert import hf, mistral_original
from convert.cli import report
from convert.tensors import ConversionError
from mistral_jax.checkpoint import write

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
FORMATS = {"hf": hf, "mistral": mistral_original}


def detect(src: Path) -> str:
    for name, module in FORMATS.items():
        if module.detect(src):
            return name
    raise ConversionError(f"{src} is not a Hugging Face model folder (config.json with "
                          "model.safetensors, a safetensors index or pytorch_model.bin) nor a "
                          "Mistral release (params.json with consolidated.*.pth or "
                          "consolidated.safetensors)")


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None,
            overwrite: bool = False, format: str = "auto", **options) -> Path:
    """Convert `src` into the checkpoint directory `out`; `options` go to the format's `plan`."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    format = detect(src) if format == "auto" else format
    module = FORMATS[format]
    if not module.detect(src):
        raise ConversionError(f"{src} is not in the {format!r} format; try --format auto")
    plan = module.plan(src, **options)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if plan.tokenizer is None:
        print(f"warning: {src} has no tokenizer; the checkpoint will take token ids only",
              file=sys.stderr)
    weights = plan.weights(DTYPES[dtype] if dtype else None)
    return write(plan.config, weights, out, tokenizer=plan.tokenizer, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.from_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the checkpoint: a folder or file in one of the formats below")
    parser.add_argument("out", help="checkpoint directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                        help="source format (default: detected from the files)")
    options = {}  # format -> the dests of its flags
    for name, module in FORMATS.items():
        if hasattr(module, "add_arguments"):
            before = {a.dest for a in parser._actions}
            module.add_arguments(parser.add_argument_group(f"{name} options"))
            options[name] = {a.dest for a in parser._actions} - before
    args = parser.parse_args(argv)

    def run():
        format = detect(Path(args.src)) if args.format == "auto" and Path(args.src).exists() \
            else args.format
        given = {k: getattr(args, k) for k in options.get(format, ())
                 if getattr(args, k) is not None}
        return convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
                       format=format, **given)

    return report(run)


if __name__ == "__main__":
    sys.exit(main())
