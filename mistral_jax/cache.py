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
    k: jax.Array  # [layers, b, kv_heads, slots, head_dim]: a head's keys contiguous, as the
    v: jax.Array  # [layers, b, kv_heads, slots, head_dim]  attention dot reads them
    index: jax.Array  # [b, slots] int32: the sequence index each slot holds, -1 if none

    @classmethod
    def create(cls, config, batch: int, length: int, dtype, kv_heads: int | None = None):
        """A cache for sequences of up to `length` indices (prompt padding included)."""
        slots = cache_slots(config, length)
        kv = kv_heads or config.num_key_value_heads
        shape = (config.n_layers, batch, kv, slots, config.head_dim)
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


def sequence_indices(start: jax.Array, c: int) -> jax.Array:
    """The sequence indices of a chunk of `c` tokens: [c] from a scalar `start` (every row
    left-aligned), [b, c] from a per-row `start` [b]."""
    return jnp.asarray(start)[..., None] + jnp.arange(c, dtype=jnp.int32)


def chunk_indices(start: jax.Array, valid: jax.Array) -> jax.Array:
    """[b, c] sequence indices of a chunk starting at `start` (a scalar, or [b]: one per row),
    -1 where `valid` is 0 (padding)."""
    return jnp.where(valid.astype(bool), sequence_indices(start, valid.shape[1]), -1)


def attend_cached(q, k_old, v_old, old_index, k_new, v_new, new_index, query_index, window):
    """A chunk's attention over the cache as it was plus the chunk's own keys, as two score
    blocks under one softmax (no copy of the cache's keys). (The first chunk of a sequence,
    whose cache holds nothing yet, attends to itself alone: `Decoder.step`.)

    q: [b, c, n, h]; k_old/v_old: [b, kv, slots, h], old_index: [b, slots] (-1: empty);
    k_new/v_new: [b, c, kv, h], new_index: [b, c] (-1: padding); query_index: [c], or [b, c]
    when each row is at its own index.
    """
    c = q.shape[1]
    key_index = jnp.concatenate([old_index, new_index], axis=1)[:, None, :]  # [b, 1, s + c]
    i = query_index[..., None]  # [c, 1] or [b, c, 1]
    mask = (key_index >= 0) & (key_index <= i)
    if window is not None:
        mask &= i - key_index < window
    k_new, v_new = (jnp.swapaxes(a, 1, 2) for a in (k_new, v_new))  # [b, kv, c, h]
    q = L.group_queries(q, k_new.shape[1])  # [b, kv, g * c, h]
    f32 = jnp.float32
    scores = jnp.concatenate([jnp.einsum("bkqh,bksh->bkqs", q, k_old, preferred_element_type=f32),
                              jnp.einsum("bkqh,bkth->bkqt", q, k_new, preferred_element_type=f32)],
                             axis=-1)
    probs = L.masked_softmax(scores, mask).astype(v_new.dtype)
    out = (jnp.einsum("bkqs,bksh->bkqh", probs[..., :-c], v_old)
           + jnp.einsum("bkqt,bkth->bkqh", probs[..., -c:], v_new))
    return L.ungroup(out, c)


def write(cache: KVCache, k, v, new_index, start) -> KVCache:
    """Every layer's chunk k/v [layers, b, c, kv, h] and indices written at slot `start mod slots`
    (in place when the cache is donated; chunks never wrap, see `generation.prefill_chunks`).
    A per-row `start` [b] writes each row at its own slot."""
    slot = start % cache.slots
    k, v = (jnp.swapaxes(a, 2, 3) for a in (k, v))  # [layers, b, kv, c, h]
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    if jnp.ndim(start) == 0:
        at = (0, 0, 0, slot, 0)
        return KVCache(jax.lax.dynamic_update_slice(cache.k, k, at),
                       jax.lax.dynamic_update_slice(cache.v, v, at),
                       jax.lax.dynamic_update_slice(cache.index, new_index, (0, slot)))
    # a scatter at [row, slot + j] of every layer and head, in place: mapping a row's
    # dynamic_update_slice over the batch instead moved the whole cache's batch axis (8
    # concurrent SmolLM2 requests of 64 tokens through the engine: 71 s with it, 49 s without)
    c = new_index.shape[1]
    rows = jnp.arange(new_index.shape[0])[:, None]  # [b, 1]
    slots = slot[:, None] + jnp.arange(c)  # [b, c]
    values = lambda a: jnp.moveaxis(a, (1, 3), (0, 1))  # [b, c, layers, kv, h]  # noqa: E731
    return KVCache(cache.k.at[:, rows, :, slots, :].set(values(k)),
                   cache.v.at[:, rows, :, slots, :].set(values(v)),
                   cache.index.at[rows, slots].set(new_index))
