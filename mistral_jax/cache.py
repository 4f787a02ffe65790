"""KV caches for generation: one fixed-shape buffer for every layer, updated in place.

Without a sliding window the cache has a slot per sequence index. With one (Mistral), it is the
rolling buffer of Mistral's reference implementation: `sliding_window` slots, index `i` written to
slot `i mod window`, so memory stays O(window) however long the sequence grows. Each slot keeps
the sequence index it holds (-1: empty or padding), and masks are computed from those indices,
with transformers' window rule (query `i` sees key `j` when `0 <= i - j < window`).

A step runs a chunk of `c` new tokens (a prefill chunk, or one token when decoding): each layer
attends over the cache as it was plus the chunk's own keys (at most `slots + c` keys, never
`T x T`), then the chunk is written at slot `start mod slots`. Chunks are aligned so that a chunk
never wraps around the end of the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mistral_jax import layers as L


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    k: jax.Array  # [layers, b, slots, kv_heads, head_dim]
    v: jax.Array  # [layers, b, slots, kv_heads, head_dim]
    index: jax.Array  # [b, slots] int32: the sequence index each slot holds, -1 if none

    @classmethod
    def create(cls, config, batch: int, length: int, dtype, kv_heads: int | None = None):
        """A cache for sequences of up to `length` indices (prompt padding included)."""
        slots = cache_slots(config, length)
        kv = kv_heads or config.num_key_value_heads
        shape = (config.n_layers, batch, slots, kv, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.full((batch, slots), -1, jnp.int32))

    @property
    def slots(self) -> int:
        return self.index.shape[1]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (self.k, self.v, self.index))


def cache_slots(config, length: int) -> int:
    window = config.sliding_window
    return length if window is None or length <= window else window


def chunk_indices(start: jax.Array, valid: jax.Array) -> jax.Array:
    """[b, c] sequence indices of a chunk starting at `start`, -1 where `valid` is 0 (padding)."""
    index = start + jnp.arange(valid.shape[1], dtype=jnp.int32)
    return jnp.where(valid.astype(bool), index[None, :], -1)


def attend_cached(q, keys, values, key_index, query_index, window):
    """Attention of a chunk's queries over keys that carry their sequence index.

    q: [b, c, n, h]; keys/values: [b, s, kv, h]; key_index: [b, s] (-1: empty or padding);
    query_index: [c].
    """
    key_index = key_index[:, None, :]  # [b, 1, s]
    i = query_index[None, :, None]  # [1, c, 1]
    mask = (key_index >= 0) & (key_index <= i)
    if window is not None:
        mask &= i - key_index < window
    out, _ = L.attention(q, keys, values, mask)
    return out


def write_layer(k_old, v_old, k, v, start):
    """One layer's cache [b, slots, kv, h] with the chunk [b, c, kv, h] written at `start`."""
    slot = start % k_old.shape[1]
    return (jax.lax.dynamic_update_slice(k_old, k.astype(k_old.dtype), (0, slot, 0, 0)),
            jax.lax.dynamic_update_slice(v_old, v.astype(v_old.dtype), (0, slot, 0, 0)))


def write_index(cache: KVCache, new_index: jax.Array, start: jax.Array) -> KVCache:
    index = jax.lax.dynamic_update_slice(cache.index, new_index, (0, start % cache.slots))
    return KVCache(cache.k, cache.v, index)
