"""Model FLOPs per token and a measured matmul peak, for MFU.

Model FLOPs follow Kaplan et al. 2020 / PaLM (Chowdhery et al. 2022, appendix B): a training
step costs 6 FLOPs per weight touched per token (forward 2, backward 4) plus 12 * layers *
heads * head_dim * seq_len per token for the attention scores and their use (not halved for
causality: the whole score matrix is computed). The embedding lookup is not a matmul and is
not counted; the LM head is. MFU divides by a large float matmul's FLOP/s measured here, so it
reads as "how close the step comes to the best this hardware does with XLA".
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def training_flops_per_token(config, seq_len: int) -> float:
    embed = config.vocab_size * config.hidden_size
    lookup = embed if not config.tie_word_embeddings else 0  # tied: the table is also the head
    if config.learned_positions is not None:  # GPT-2's position table: a lookup too
        lookup += config.learned_positions * config.hidden_size
    dense = config.num_params() - lookup
    attention = 12 * config.n_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * dense + attention


def matmul_flops_per_s(device=None, dtype=jnp.float32, n: int | None = None,
                       repeats: int = 5) -> float:
    """FLOP/s of a jitted n x n x n matmul on `device` (median of `repeats` after a warm-up)."""
    device = device or jax.devices()[0]
    n = n or (2048 if device.platform == "cpu" else 8192)
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times))


def peak_flops_per_s(devices, dtype) -> float:
    """What the mesh's devices do together: CPU 'devices' in one process share the machine's
    cores, so their peak is one device's; accelerators add up."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    one = matmul_flops_per_s(local[0], dtype)
    if local[0].platform == "cpu":
        return one * jax.process_count()
    return one * len(devices)
