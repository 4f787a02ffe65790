"""Convert a torch-side checkpoint into a mistral_jax checkpoint directory.

SRC is what you hold: a Hugging Face model folder (config.json with model.safetensors, sharded
safetensors and their index, or pytorch_model.bin) or a Hub repo id; Mistral's original release
(params.json with consolidated.*.pth or consolidated.safetensors); a GGUF file (llama / mistral
architecture, dequantized); or a Megatron-LM GPT-2 checkpoint (the NGC .zip, a .pt, or a
training run's directory with tensor-parallel / pipeline shards). The format is detected. The
tokenizer comes along (tokenizer.model, tokenizer.json, GPT-2's vocab.json + merges.txt, a GGUF
file's metadata, or Megatron's --vocab-file / --merge-file).

Tensors are converted one at a time, so memory holds about one tensor, and OUT appears only once
it is complete.

    python -m convert.from_torch path/to/hf-folder ckpt/
    python -m convert.from_torch mistralai/Mistral-7B-v0.1 ckpt/ --dtype bfloat16
    python -m convert.from_torch path/to/hf-folder ckpt-int8/ --quantize int8

`--quantize int8` stores the matmul weights as int8 with a float32 scale per output channel
(`mistral_jax.quant.int8`); a GGUF file's Q8_0 tensors keep their own int8 values and block scales.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.cli import report
from convert.formats import gguf, hf, megatron, mistral_original
from convert.read.errors import ConversionError, listed
from convert.read.sources import SafetensorsFile
from mistral_jax import cli
from mistral_jax.io.checkpoint import StreamingWriter
from mistral_jax.quant import int8 as quant

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Each format is a module with `detect(path) -> bool` and `conversion(path, **options) ->
# Conversion`; a module with options adds their flags in `add_arguments(parser)`, and the flags
# the user sets reach its `conversion` as keyword arguments. A module whose tensors may be
# stored quantized says what --dtype / --quantize make of them in `storage_notes`.
FORMATS = {"hf": hf, "mistral": mistral_original, "gguf": gguf, "megatron": megatron}


def detect(src: Path) -> str:
    for name, module in FORMATS.items():
        if module.detect(src):
            return name
    if src.is_file() and src.suffix == ".safetensors":
        SafetensorsFile(src)  # raises when it is not one
        raise ConversionError(f"{src} is a bare safetensors file; give the folder that holds it "
                              "with its config.json (a Hugging Face model folder)")
    if src.is_dir():
        names = sorted(p.name for p in src.iterdir())
        what = f"a folder of {len(names)} file(s) ({', '.join(names[:3])}" \
            f"{', ...' * (len(names) > 3)})" if names else "an empty folder"
    else:
        what = "a file"
    raise listed(f"{src}: {what}, not a checkpoint this converter reads; give one of:",
                 [f"{name}: {module.DESCRIPTION}" for name, module in FORMATS.items()])


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None,
            overwrite: bool = False, format: str = "auto", revision: str | None = None,
            progress: bool = False, quantize: str | None = None, **options) -> Path:
    """Convert `src` (a path, or a Hugging Face Hub repo id) into the checkpoint directory `out`,
    one tensor at a time; `options` go to the format's `conversion`."""
    src = resolve(src, revision)
    format = detect(src) if format == "auto" else format
    module = FORMATS[format]
    if not module.detect(src):
        raise ConversionError(f"{src} is not in the {format!r} format; try --format auto")
    conversion = module.conversion(src, **options)
    quant.check_method(quantize)
    groups = conversion.quantized_groups() if quantize else {}
    notes = list(conversion.notes)
    if hasattr(module, "storage_notes"):  # what the flags make of a quantized source's tensors
        notes += module.storage_notes(conversion, dtype=dtype, quantize=quantize,
                                      kept=set(groups))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if conversion.tokenizer is None:
        print(f"warning: {src} has no tokenizer; the checkpoint will take token ids only",
              file=sys.stderr)
    with StreamingWriter(conversion.config, out, tokenizer=conversion.tokenizer,
                         overwrite=overwrite, quantize=quantize, groups=groups) as writer:
        conversion.convert(dtype=DTYPES[dtype] if dtype else None, progress=progress,
                           quantized=set(groups),
                           sink=lambda name, layer, value: writer.put(name, value, layer))
    return writer.path


def resolve(src: str | Path, revision: str | None = None) -> Path:
    """`src` itself when it exists, else a Hub repo id's snapshot (`owner/name`), or one file of
    it (`owner/name/file.gguf`), from huggingface_hub's cache (downloaded first unless
    HF_HUB_OFFLINE=1, or when the Hub cannot be reached)."""
    if Path(src).exists():
        return Path(src)
    match = REPO_ID.fullmatch(str(src))
    if match is None:
        raise ConversionError(f"{src} does not exist (and is not a Hub repo id like "
                              "mistralai/Mistral-7B-v0.1 or owner/name/file.gguf)")
    from huggingface_hub import constants

    repo, filename = match["repo"], match["file"]
    if constants.HF_HUB_OFFLINE:
        return _from_cache(src, repo, filename, revision, "HF_HUB_OFFLINE=1 is set")
    if not _hub_reachable(constants.ENDPOINT):
        return _from_cache(src, repo, filename, revision,
                           f"cannot reach the Hub ({constants.ENDPOINT})")
    try:
        return _download(repo, filename, revision)
    except Exception as e:  # noqa: BLE001 (the hub client's errors come from several libraries)
        if not _is_network_error(e):
            raise
        return _from_cache(src, repo, filename, revision, f"cannot reach the Hub ({e})")


def _download(repo: str, filename: str | None, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    skip = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.gguf", "original/*"]
    try:
        if filename:
            return Path(hf_hub_download(repo, filename, revision=revision))
        if any(f.endswith(".safetensors") for f in list_repo_files(repo, revision=revision)):
            skip += ["*.bin", "*.pth", "*.pt"]  # fetch only one copy of the weights
        return Path(snapshot_download(repo, revision=revision, ignore_patterns=skip))
    except HfHubHTTPError as e:
        raise ConversionError(f"{repo}: the Hugging Face Hub says: {str(e).splitlines()[0]}"
                              ) from None


def _from_cache(src, repo: str, filename: str | None, revision: str | None, why: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        if filename:
            return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=True))
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        offline = why.startswith("HF_HUB_OFFLINE")
        raise ConversionError(
            f"{src}: {why} and it is not in the Hugging Face cache; "
            + ("unset HF_HUB_OFFLINE to download it" if offline else
               "set HF_HUB_OFFLINE=1 and download it where there is a network "
               f"(hf download {repo}), or give a local path")) from None


def _hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the Hub opens within `timeout` s (the Hub client itself
    retries for about half a minute before it gives up)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_network_error(e: Exception) -> bool:
    return isinstance(e, OSError | TimeoutError) or type(e).__module__.split(".")[0] in (
        "httpx", "httpx2", "httpcore", "requests", "urllib3")


REPO_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<file>[\w./-]+\.gguf))?")


def main(argv=None) -> int:
    parser = cli.parser("python -m convert.from_torch", __doc__)
    parser.add_argument("src", help="the checkpoint: a folder or file in one of the formats "
                        "above, or a Hugging Face Hub repo id (through huggingface_hub's cache; "
                        "HF_HUB_OFFLINE=1 uses the cache only)")
    parser.add_argument("out", help="checkpoint directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights to this dtype (default: keep the source's)")
    parser.add_argument("--quantize", choices=list(quant.METHODS), default=None,
                        help="store the matmul weights as int8 with per-channel scales "
                        "(about 27%% of float32 on disk; faster decoding on a CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                        help="source format, when detection is not what you want")
    options = {}  # format -> the dests of its flags
    for name, module in FORMATS.items():
        if hasattr(module, "add_arguments"):
            before = {a.dest for a in parser._actions}
            module.add_arguments(parser.add_argument_group(f"{name} options"))
            options[name] = {a.dest for a in parser._actions} - before

    def run(args):
        src = resolve(args.src, args.revision)
        format = detect(src) if args.format == "auto" else args.format
        given = {k: getattr(args, k) for k in options.get(format, ())
                 if getattr(args, k) is not None}
        return convert(src, args.out, dtype=args.dtype, overwrite=args.overwrite, format=format,
                       progress=not args.no_progress, quantize=args.quantize, **given)

    return cli.entry(parser, lambda args: report(lambda: run(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
