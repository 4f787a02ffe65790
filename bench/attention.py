"""Attention kernels on one device, bfloat16: each of our implementations (`nn.attention`:
"blockwise" flash attention in JAX, "xla" materialized scores, "cudnn" and "splash" where the
backend has them) against `jax.nn.dot_product_attention`'s XLA implementation, forward and
forward + backward, causal at Mistral-7B's head shape (32 query heads, 8 kv heads, head_dim 128),
and with Mistral's 4096-token sliding window (cuDNN: `local_window_size`).

    python bench/attention.py [--small] [--json out.json]
    python bench/attention.py --cpu     # the CPU figures README quotes (see below)

cuDNN runs only on an NVIDIA GPU; elsewhere its rows say why they are missing. `--small` shrinks
the shapes so that the script can be tried on a CPU. `--cpu` takes the CPU benchmark Mistral's
head shape instead (8 query heads, 2 kv heads, head_dim 64; float32; batch 1; 8192 tokens,
causal and with a 512 window) and adds torch's `scaled_dot_product_attention` (its fused CPU
kernel; causal only: handed a window as a mask it materializes the scores).
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
from mistral_jax.nn import attention as A  # noqa: E402
from mistral_jax.nn.masking import Masking  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def ours(implementation: str):
    def attend(q, k, v, window):
        masking = Masking(jnp.ones(q.shape[:2], bool), None, window)
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


def flops(batch: int, t: int, window: int | None, backward: bool,
          heads=(HEADS, KV_HEADS, HEAD_DIM)) -> float:
    """Matmul FLOPs a causal (windowed) kernel needs: the visible half (band) of the scores."""
    visible = t * (t + 1) / 2 if window is None else sum(min(i + 1, window) for i in range(t))
    forward = 4 * batch * heads[0] * heads[2] * visible  # scores and values: 2 matmuls
    # forward + backward as FlashAttention counts it: the backward is 5 matmuls of that size
    # (the recomputed scores, and the gradients of values, probabilities, queries and keys)
    return forward * (3.5 if backward else 1.0)


def measure(kernel, batch: int, t: int, window: int | None, backward: bool,
            heads=(HEADS, KV_HEADS, HEAD_DIM), dtype=jnp.bfloat16) -> float:
    n, kv, h = heads
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, t, n, h), dtype)
    k, v = (jax.random.normal(key, (batch, t, kv, h), dtype) for key in keys[1:])
    if backward:
        loss = lambda q, k, v: jnp.sum(kernel(q, k, v, window).astype(jnp.float32))
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    else:
        fn = jax.jit(lambda q, k, v: kernel(q, k, v, window))
    return median_time(lambda: jax.block_until_ready(fn(q, k, v)), repeats=5, warmup=2)


def torch_sdpa(batch: int, t: int, window, backward: bool, heads) -> float:
    """torch's fused attention, causal, kv heads repeated for the query heads (as transformers'
    sdpa path does), float32, the threads XLA uses."""
    import torch

    from bench.common import equal_threads

    if window is not None:
        raise ValueError("sdpa has no fused windowed kernel: given a mask it materializes")
    equal_threads()
    n, kv, h = heads
    q = torch.randn(batch, n, t, h, requires_grad=backward)
    k, v = (torch.randn(batch, kv, t, h, requires_grad=backward) for _ in range(2))

    def run():
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(n // kv, 1), v.repeat_interleave(n // kv, 1), is_causal=True)
        if backward:
            out.sum().backward()

    if backward:
        return median_time(run, repeats=5, warmup=2)
    with torch.no_grad():
        return median_time(run, repeats=5, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--cpu", action="store_true", help="the CPU benchmark model's heads")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    heads, dtype = (HEADS, KV_HEADS, HEAD_DIM), jnp.bfloat16
    shapes = [(4, 2048, None), (1, 8192, 4096)] if not args.small else [(1, 256, None),
                                                                      (1, 512, 128)]
    kernels = dict(KERNELS)
    if args.cpu:
        heads, dtype, shapes = (8, 2, 64), jnp.float32, [(1, 8192, None), (1, 8192, 512)]
        kernels = {"blockwise": KERNELS["blockwise"], "torch-sdpa": None}
    device = jax.devices()[0]
    peak = chip_peaks(device.device_kind)
    rows = []
    for batch, t, window in shapes:
        for backward in (False, True):
            for name, kernel in kernels.items():
                row = {"kernel": name, "batch": batch, "seq": t, "window": window,
                       "pass": "forward+backward" if backward else "forward"}
                try:
                    seconds = (torch_sdpa(batch, t, window, backward, heads) if kernel is None
                               else measure(kernel, batch, t, window, backward, heads, dtype))
                except Exception as e:  # cuDNN off an NVIDIA GPU, or a shape it refuses
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                else:
                    row["ms"] = 1000 * seconds
                    row["tflops"] = flops(batch, t, window, backward, heads) / seconds / 1e12
                    if peak is not None:
                        row["of_chip_peak"] = row["tflops"] * 1e12 / peak[0]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": device.device_kind, "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
