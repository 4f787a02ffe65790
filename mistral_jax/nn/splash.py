"""Splash attention, Pallas' sparse flash attention kernel for TPUs (`jax.experimental.pallas.
ops.tpu.splash_attention`), behind `attention="splash"`: a causal mask, or a local one for the
sliding window (query i sees keys i - window + 1 .. i), packed documents as segment ids, and
grouped-query attention in its multi-head form (query heads a multiple of the kv heads).

On a CPU it runs in Pallas' interpret mode, slowly: what the tests use on tiny shapes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from mistral_jax.nn.masking import Masking, pad_to_blocks, per_device
from mistral_jax.parallel.sharding import platform

MIN_BLOCK = 128  # the kernel's tiles are multiples of the TPU's 128 lanes


def splash_attention(q, k, v, masking: Masking, block_q: int = 512, block_k: int = 512):
    """q [b, t, n, h], k / v [b, t, kv, h] -> [b, t, n, h]."""

    def local(q, k, v, valid, segments):
        b, t, n, h = q.shape
        bq = max(MIN_BLOCK, min(block_q, -(-t // MIN_BLOCK) * MIN_BLOCK))
        bk = max(MIN_BLOCK, min(block_k, -(-t // MIN_BLOCK) * MIN_BLOCK))
        q, k, v, valid, segments = pad_to_blocks(math.lcm(bq, bk), q, k, v, valid, segments)
        padded = q.shape[1]
        shape = (padded, padded)
        one = (masks.CausalMask(shape) if masking.window is None else
               masks.LocalMask(shape, (masking.window - 1, 0), offset=0))
        sizes = kernel.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                                  block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                                  block_kv_dq=bk)
        attend = kernel.make_splash_mha(masks.MultiHeadMask([one] * n), head_shards=1,
                                        q_seq_shards=1, block_sizes=sizes,
                                        interpret=platform() != "tpu")
        ids = jnp.where(valid, segments, -1)  # padding: a document no real token is in
        heads_first = lambda a: a.transpose(0, 2, 1, 3)  # [b, heads, t, h]
        scaled = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
        out = jax.vmap(lambda q_, k_, v_, s_: attend(
            q_, k_, v_, segment_ids=kernel.SegmentIds(q=s_, kv=s_)))(
            heads_first(scaled), heads_first(k), heads_first(v), ids)
        return heads_first(out)[:, :t]

    return per_device(local, q, k, v, masking)
