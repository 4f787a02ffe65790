"""What the benchmarks share: timing, equal thread counts, and this machine's measured rates."""

from __future__ import annotations

import os
import time

import numpy as np


def equal_threads() -> int:
    """Give torch every core, as XLA's CPU client takes them all; the count used by both."""
    import torch

    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def timed(fn, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` runs of `fn()`, after `warmup` unmeasured ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` unmeasured ones."""
    return float(np.median(timed(fn, warmup, repeats)))


def copy_bandwidth(mbytes: int = 256) -> float:
    """Bytes/s moved copying a float32 array of `mbytes` MB into another (read once, written
    once, as in STREAM's copy; numpy's copy streams at the memory's rate, where an XLA
    elementwise op on the CPU does not): the memory rate MBU is measured against."""
    src = np.ones(mbytes << 18, np.float32)
    dst = np.empty_like(src)
    seconds = median_time(lambda: np.copyto(dst, src), repeats=9)
    return 2 * src.nbytes / seconds


# Datasheet figures for MFU / MBU on accelerators: (dense bfloat16 FLOP/s, memory bytes/s), by a
# substring of `jax.devices()[0].device_kind`, most specific first (NVIDIA's H100 / H200 / A100
# product briefs; SXM parts unless the name says PCIe).
CHIPS = [
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),
    ("H200", 989e12, 4.8e12),
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100", 312e12, 2.039e12),
]


def chip_peaks(device_kind: str) -> tuple[float, float] | None:
    """(bfloat16 FLOP/s, memory bytes/s) of an accelerator from its datasheet, None if unknown."""
    for name, flops, bandwidth in CHIPS:
        if name.lower() in device_kind.lower():
            return flops, bandwidth
    return None
