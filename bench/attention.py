"""Attention kernels on one device, bfloat16: each of our implementations (`mistral_jax.attention`:
"blockwise" flash attention in JAX, "xla" materialized scores, "cudnn" and "splash" where the
backend has them) against `jax.nn.dot_product_attention`'s XLA implementation, forward and
forward + backward, causal at Mistral-7B's head shape (32 query heads, 8 kv heads, head_dim 128),
and with Mistral's 4096-token sliding window (cuDNN: `local_window_size`).

    python bench/attention.py [--small] [--json out.json]

cuDNN runs only on an NVIDIA GPU; elsewhere its rows say why they are missing. `--small` shrinks
the shapes so that the script can be tried on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import chip_peaks, median_time  # noqa: E402
from mistral_jax import attention as A  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def ours(implementation: str):
    def attend(q, k, v, window):
        masking = A.Masking(jnp.ones(q.shape[:2], bool), None, window)
        return A.attend_with(implementation, masking, dtype=q.dtype, left_padded=False)(
            q, k, v)[0]
    return attend


def library(implementation: str):
    def attend(q, k, v, window):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=implementation,
            local_window_size=None if window is None else (window - 1, 0))
    return attend


KERNELS = {"cudnn": ours("cudnn"), "splash": ours("splash"), "blockwise": ours("blockwise"),
           "ours-xla": ours("xla"), "jax-xla": library("xla")}


def flops(batch: int, t: int, window: int | None, backward: bool) -> float:
    """Matmul FLOPs a causal (windowed) kernel needs: the visible half (band) of the scores."""
    visible = t * (t + 1) / 2 if window is None else sum(min(i + 1, window) for i in range(t))
    forward = 4 * batch * HEADS * HEAD_DIM * visible  # scores and values: 2 matmuls
    # forward + backward as FlashAttention counts it: the backward is 5 matmuls of that size
    # (the recomputed scores, and the gradients of values, probabilities, queries and keys)
    return forward * (3.5 if backward else 1.0)


def measure(kernel, batch: int, t: int, window: int | None, backward: bool) -> float:
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, t, HEADS, HEAD_DIM), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, t, KV_HEADS, HEAD_DIM), jnp.bfloat16)
            for key in keys[1:])
    if backward:
        loss = lambda q, k, v: jnp.sum(kernel(q, k, v, window).astype(jnp.float32))
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    else:
        fn = jax.jit(lambda q, k, v: kernel(q, k, v, window))
    return median_time(lambda: jax.block_until_ready(fn(q, k, v)), repeats=5, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shapes = [(4, 2048, None), (1, 8192, 4096)] if not args.small else [(1, 256, None),
                                                                      (1, 512, 128)]
    device = jax.devices()[0]
    peak = chip_peaks(device.device_kind)
    rows = []
    for batch, t, window in shapes:
        for backward in (False, True):
            for name, kernel in KERNELS.items():
                row = {"kernel": name, "batch": batch, "seq": t, "window": window,
                       "pass": "forward+backward" if backward else "forward"}
                try:
                    seconds = measure(kernel, batch, t, window, backward)
                except Exception as e:  # cuDNN off an NVIDIA GPU, or a shape it refuses
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                else:
                    row["ms"] = 1000 * seconds
                    row["tflops"] = flops(batch, t, window, backward) / seconds / 1e12
                    if peak is not None:
                        row["of_chip_peak"] = row["tflops"] * 1e12 / peak[0]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": device.device_kind, "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
