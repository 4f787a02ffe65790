"""`python bench/decode.py`: greedy decode tokens/s vs transformers' generate(use_cache=True)
on the same weights (a SmolLM2-135M-shaped Llama: 30 layers, hidden 576, 9 heads, 3 kv heads),
time to first token including compilation, and sliding-window decode latency by position
(W = 64) with the rolling buffer's size."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

import mistral_jax
from convert import hf
from mistral_jax import models

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2)


def median_time(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def decode_speed(theirs, mine, batch, prompt_len=16, new=32):
    ids = np.random.default_rng(0).integers(3, 1000, (batch, prompt_len))
    t_ids = torch.tensor(ids, device=theirs.device)

    def hf_run():
        with torch.no_grad():
            theirs.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=new,
                            min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)

    def our_run():
        mistral_jax.generate_tokens(mine, ids, max_new_tokens=new)

    start = time.perf_counter()
    our_run()
    first = time.perf_counter() - start
    hf_run()
    ours_s, hf_s = median_time(our_run), median_time(hf_run)
    # the same prompt with 1 new token: what prefill costs, to take out of both
    ours_p = median_time(lambda: mistral_jax.generate_tokens(mine, ids, max_new_tokens=1))

    def hf_prefill():
        with torch.no_grad():
            theirs.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=1,
                            do_sample=False, use_cache=True, pad_token_id=0)

    hf_p = median_time(hf_prefill)
    ours_tps = batch * (new - 1) / (ours_s - ours_p)
    hf_tps = batch * (new - 1) / (hf_s - hf_p)
    return {"batch": batch, "ours_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps,
            "ratio": ours_tps / hf_tps, "first_call_s": first}


def window_latency(mine, window=64, steps=16):
    """ms per decoded token at positions W, 4W, 16W of a sliding-window model, and cache bytes."""
    import dataclasses
    import importlib

    gen = importlib.import_module("mistral_jax.generate")
    config = dataclasses.replace(mine.config, sliding_window=window)
    windowed = models.with_weights(models.abstract(config), models.weights(mine))
    rows = []
    for multiple in (1, 4, 16):
        ids = np.random.default_rng(1).integers(3, 1000, (1, window * multiple - 1))
        run = gen.Generation(windowed, ids, None, steps + 2, gen.Sampling(), 0)
        run.advance(2)
        seconds = median_time(lambda run=run: (run.advance(1), run.state.out.block_until_ready()),
                              repeats=steps)
        rows.append({"position": f"{multiple}W", "ms_per_token": 1000 * seconds,
                     "cache_bytes": run.state.cache.nbytes()})
    return rows


def read_bandwidth():
    """Bytes/s a jitted matrix-vector product streams from a 256 MB float32 matrix."""
    w = jax.numpy.ones((8192, 8192), jax.numpy.float32)
    x = jax.numpy.ones((1, 8192), jax.numpy.float32)
    gemv = jax.jit(lambda x, w: x @ w)
    gemv(x, w).block_until_ready()
    return w.nbytes / median_time(lambda: gemv(x, w).block_until_ready(), repeats=9)


def time_to_first_token(mine):
    jax.clear_caches()
    ids = np.random.default_rng(2).integers(3, 1000, (1, 12))
    start = time.perf_counter()
    mistral_jax.generate_tokens(mine, ids, max_new_tokens=1)
    return time.perf_counter() - start


def main():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", help="torch device for transformers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SMOLLM2)
        theirs = transformers.LlamaForCausalLM(config).eval().to(getattr(torch, args.dtype))
        theirs.save_pretrained(tmp)
        theirs = theirs.to(args.device)
        cfg, weights = hf.convert(Path(tmp))
        mine = models.with_weights(models.abstract(cfg), jax.device_put(weights))
    print(f"transformers on {args.device}, mistral_jax on {jax.devices()[0]}, {args.dtype}")
    decode = [decode_speed(theirs, mine, b) for b in (1, 8)]
    bandwidth = read_bandwidth()
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(models.weights(mine)))
    results = {"ttft_with_compile_s": time_to_first_token(mine), "decode": decode,
               "read_bandwidth_GBps": bandwidth / 1e9,
               "mbu_batch1": weight_bytes * decode[0]["ours_tokens_per_s"] / bandwidth,
               "window_latency": window_latency(mine)}
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
