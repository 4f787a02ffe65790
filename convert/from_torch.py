"""`python -m convert.from_torch SRC OUT`: a torch-side checkpoint -> a mistral_jax checkpoint.

SRC is a Hugging Face folder (config.json + model.safetensors | sharded safetensors + index |
pytorch_model.bin); its tokenizer (tokenizer.model or tokenizer.json) is carried over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from convert import hf
from convert.tensors import ConversionError
from mistral_jax.checkpoint import CheckpointError, write
from mistral_jax.tokenizer import Tokenizer

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None,
            overwrite: bool = False) -> Path:
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    if not hf.is_hf_folder(src):
        raise ConversionError(f"{src} is not a Hugging Face model folder (config.json with "
                              "model.safetensors, a safetensors index or pytorch_model.bin)")
    config, weights = hf.convert(src, DTYPES[dtype] if dtype else None)
    tokenizer = Tokenizer.from_dir(src)
    if tokenizer is None:
        print(f"warning: {src} has no tokenizer.model or tokenizer.json; the checkpoint will "
              "take token ids only", file=sys.stderr)
    return write(config, weights, out, tokenizer=tokenizer, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.from_torch", description=__doc__)
    parser.add_argument("src", help="Hugging Face model folder")
    parser.add_argument("out", help="checkpoint directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        path = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
