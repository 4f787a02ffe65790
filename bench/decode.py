"""`python bench/decode.py`: greedy decode tokens/s vs transformers' generate(use_cache=True)
on the same weights (a SmolLM2-135M-shaped Llama: 30 layers, hidden 576, 9 heads, 3 kv heads),
time to first token including compilation, and sliding-window decode latency by position."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

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
    t_ids = torch.tensor(ids)

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


def main():
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SMOLLM2)
        theirs = transformers.LlamaForCausalLM(config).eval()
        theirs.save_pretrained(tmp)
        cfg, weights = hf.convert(Path(tmp))
        mine = models.with_weights(models.abstract(cfg), weights)
    results = [decode_speed(theirs, mine, b) for b in (1, 8)]
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
