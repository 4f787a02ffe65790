"""`python -m convert.from_torch SRC OUT`: a torch-side checkpoint -> a mistral_jax checkpoint.

SRC is a Hugging Face folder (config.json + model.safetensors | sharded safetensors + index |
pytorch_model.bin) or Mistral's original release (params.json + consolidated.*.pth |
consolidated.safetensors) or a GGUF file (llama.cpp's format, llama / mistral architecture,
dequantized) or a Megatron-LM GPT-2 checkpoint (NGC .zip, .pt, or a checkpoint directory with
tensor-parallel / pipeline shards); its tokenizer (tokenizer.model, tokenizer.json or GPT-2's
vocab.json + merges.txt; a GGUF file's metadata; Megatron's --vocab-file/--merge-file) is
carried over.

Each format is a module with `detect(path) -> bool` and `plan(path, **options) -> Plan`; a module
with options adds their flags in `add_arguments(parser)`, and the flags the user sets reach its
`plan` as keyword arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from convert import gguf, hf, megatron, mistral_original
from convert.cli import report
from convert.tensors import ConversionError
from mistral_jax.checkpoint import StreamingWriter

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
FORMATS = {"hf": hf, "mistral": mistral_original, "gguf": gguf, "megatron": megatron}


def detect(src: Path) -> str:
    for name, module in FORMATS.items():
        if module.detect(src):
            return name
    raise ConversionError(f"{src} is not a Hugging Face model folder (config.json with "
                          "model.safetensors, a safetensors index or pytorch_model.bin) nor a "
                          "Mistral release (params.json with consolidated.*.pth or "
                          "consolidated.safetensors) nor a GGUF file nor a Megatron-LM checkpoint "
                          "(.zip, .pt, or a directory of mp_rank_XX/model_optim_rng.pt)")


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None,
            overwrite: bool = False, format: str = "auto", revision: str | None = None,
            progress: bool = False, **options) -> Path:
    """Convert `src` (a path, or a Hugging Face Hub repo id) into the checkpoint directory `out`,
    one tensor at a time; `options` go to the format's `plan`."""
    src = resolve(src, revision)
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
    with StreamingWriter(plan.config, out, tokenizer=plan.tokenizer,
                         overwrite=overwrite) as writer:
        plan.convert(dtype=DTYPES[dtype] if dtype else None, progress=progress,
                     sink=lambda name, layer, value: writer.put(name, value, layer))
    return writer.path


def resolve(src: str | Path, revision: str | None = None) -> Path:
    """`src` itself when it exists, else a Hub repo id's snapshot (`owner/name`), or one file of
    it (`owner/name/file.gguf`), from huggingface_hub's cache (downloaded first unless
    HF_HUB_OFFLINE=1)."""
    if Path(src).exists():
        return Path(src)
    match = REPO_ID.fullmatch(str(src))
    if match is None:
        raise ConversionError(f"{src} does not exist (and is not a Hub repo id like "
                              "mistralai/Mistral-7B-v0.1 or owner/name/file.gguf)")
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, filename = match["repo"], match["file"]
    skip = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.gguf", "original/*"]
    try:
        if filename:
            return Path(hf_hub_download(repo, filename, revision=revision))
        if not constants.HF_HUB_OFFLINE:  # fetch only one copy of the weights
            from huggingface_hub import list_repo_files

            files = list_repo_files(repo, revision=revision)
            if any(f.endswith(".safetensors") for f in files):
                skip += ["*.bin", "*.pth", "*.pt"]
        return Path(snapshot_download(repo, revision=revision, ignore_patterns=skip))
    except LocalEntryNotFoundError:
        raise ConversionError(
            f"{src}: not a path, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            "with HF_HUB_OFFLINE=1 it must be downloaded beforehand") from None
    except (HfHubHTTPError, OSError) as e:
        raise ConversionError(f"{src}: cannot fetch from the Hugging Face Hub: {e}") from None


REPO_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<file>[\w./-]+\.gguf))?")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.from_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the checkpoint: a folder or file in one of the formats below, "
                        "or a Hugging Face Hub repo id (resolved through the huggingface_hub "
                        "cache; HF_HUB_OFFLINE=1 uses the cache only)")
    parser.add_argument("out", help="checkpoint directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        src = resolve(args.src, args.revision)
        format = detect(src) if args.format == "auto" else args.format
        given = {k: getattr(args, k) for k in options.get(format, ())
                 if getattr(args, k) is not None}
        return convert(src, args.out, dtype=args.dtype, overwrite=args.overwrite, format=format,
                       progress=not args.no_progress, **given)

    return report(run)


if __name__ == "__main__":
    sys.exit(main())
