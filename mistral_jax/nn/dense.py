"""Dense attention ("xla" in `attention.IMPLEMENTATIONS`): the scores materialized as one
[b, k, g * t, s] tensor under a boolean [b, t, s] mask, as transformers' eager path computes them;
the reference the other implementations (blockwise, splash, cuDNN, the decode kernel) are tested
against. `group_queries` / `ungroup` are the layout the cached decode step shares.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """[b, t, n, h] -> [b, k, g * t, h], scaled by 1/sqrt(h): each kv head's queries in one block,
    so the score matmul writes [b, k, g * t, s] with keys minor, the layout softmax and the
    value matmul read (left to pick, XLA's CPU backend wrote the scores query-head minor and then
    transposed the whole score tensor)."""
    b, t, n, h = q.shape
    q = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
    return (q * (1.0 / math.sqrt(h))).reshape(b, kv_heads, -1, h)


def ungroup(out: jax.Array, t: int) -> jax.Array:
    """The inverse of `group_queries`' layout: [b, k, g * t, h] -> [b, t, n, h]."""
    b, k, _, h = out.shape
    return out.reshape(b, k, -1, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, h)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis of float32 scores [b, k, g * t, s] where mask [b, t, s] allows.
    A row with nothing allowed gets a uniform average, never NaN."""
    b, k, _, s = scores.shape
    scores = scores.reshape(b, k, -1, *mask.shape[1:])
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).reshape(b, k, -1, s)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              return_weights: bool = False):
    """Grouped-query attention. q: [b, t, n, h], k/v: [b, s, k, h], mask: [b, t, s] bool.

    Each kv head serves n // k query heads (k == 1 is multi-query attention). Returns the output
    [b, t, n, h] and, when asked, the attention probabilities [b, n, t, s] (float32).
    A query whose keys are all masked (a padding position) gets a uniform average, never NaN.
    """
    b, t, n, h = q.shape
    k, v = (jnp.swapaxes(a, 1, 2) for a in (k, v))  # [b, k, s, h]
    scores = jnp.einsum("bkqh,bksh->bkqs", group_queries(q, k.shape[1]), k,
                        preferred_element_type=jnp.float32)
    probs = masked_softmax(scores, mask)
    out = ungroup(jnp.einsum("bkqs,bksh->bkqh", probs.astype(v.dtype), v), t)
    return out, (probs.reshape(b, n, t, -1) if return_weights else None)


QUERY_BLOCKS, MIN_QUERY_BLOCK = 8, 128  # causal attention: at most 8 blocks of at least 128


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attention` under a causal [b, t, t] mask (query i never sees key j > i, whatever else
    the mask says), in query blocks each scored only against the keys up to its own end:
    with n blocks, (n + 1) / 2n of the score work. A query that sees any key gets what
    `attention` gives it; a fully masked one (padding) averages the values of its block's keys."""
    t = q.shape[1]
    size = max(MIN_QUERY_BLOCK, -(-t // QUERY_BLOCKS))
    return jnp.concatenate([
        attention(q[:, lo:lo + size], k[:, :lo + size], v[:, :lo + size],
                  mask[:, lo:lo + size, :lo + size])[0]
        for lo in range(0, t, size)], axis=1)
