"""`python -m convert.from_torch SRC OUT`: a torch-side checkpoint -> a mistral_jax checkpoint.

SRC is a Hugging Face folder (config.json + model.safetensors | sharded safetensors + index |
pytorch_model.bin) or Mistral's original release (params.json + consolidated.*.pth |
consolidated.safetensors); its tokenizer (tokenizer.model, tokenizer.json or GPT-2's
vocab.json + merges.txt) is carried over.
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
from mistral_jax.tokenizer import Tokenizer

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
FORMATS = {"hf": (hf.is_hf_folder, hf.convert),
           "mistral": (mistral_original.is_mistral_folder, mistral_original.convert)}


def detect(src: Path) -> str:
    for name, (matches, _) in FORMATS.items():
        if matches(src):
            return name
    raise ConversionError(f"{src} is not a Hugging Face model folder (config.json with "
                          "model.safetensors, a safetensors index or pytorch_model.bin) nor a "
                          "Mistral release (params.json with consolidated.*.pth or "
                          "consolidated.safetensors)")


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None,
            overwrite: bool = False, format: str = "auto") -> Path:
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    format = detect(src) if format == "auto" else format
    matches, convert_folder = FORMATS[format]
    if not matches(src):
        raise ConversionError(f"{src} is not in the {format!r} format; try --format auto")
    config, weights = convert_folder(src, DTYPES[dtype] if dtype else None)
    tokenizer = Tokenizer.from_dir(src)
    if tokenizer is None:
        print(f"warning: {src} has no tokenizer.model or tokenizer.json; the checkpoint will "
              "take token ids only", file=sys.stderr)
    return write(config, weights, out, tokenizer=tokenizer, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.from_torch", description=__doc__)
    parser.add_argument("src", help="Hugging Face model folder or Mistral release folder")
    parser.add_argument("out", help="checkpoint directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                        help="source format (default: detected from the files)")
    args = parser.parse_args(argv)
    return report(lambda: convert(args.src, args.out, dtype=args.dtype,
                                  overwrite=args.overwrite, format=args.format))


if __name__ == "__main__":
    sys.exit(main())
