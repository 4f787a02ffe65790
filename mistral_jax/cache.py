"""KV caches for generation: one fixed-shape buffer for every layer, updated in place.

Without a sliding window the cache has a slot per sequence index. With one (Mistral), it is the
rolling buffer of Mistral's reference implementation: `sliding_window` slots, index `i` written to
slot `i mod window`, so memory stays O(window) however long the sequence grows. Each slot keeps
the sequence index it holds (-1: empty or padding), and masks are computed from those indices,
with transformers' window rule (query `i` sees key `j` when `0 <= i - j < window`).

A step runs a chunk of `c` new tokens (a prefill chunk, or one token when decoding): each layer
attends over the cache as it was plus the chunk's own keys (never `T x T`), reading only the
blocks of slots that hold anything, then the chunk is written at slot `start mod slots`. Chunks
are aligned so that a chunk never wraps around the end of the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mistral_jax import layers as L

# Keys read per trip of the loop over a cache (see `attend_cached`).
BLOCK = 256


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    k: jax.Array  # [layers, b, kv_heads, head_dim, slots]: keys transposed, slots minor, so a
    #               query's scores are one matrix product that writes the slots contiguously
    v: jax.Array  # [layers, b, kv_heads, slots, head_dim]
    index: jax.Array  # [b, slots] int32: the sequence index each slot holds, -1 if none
    # int8 caches: each key's and value's scale per head, float16 [layers, b, kv_heads, slots]
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def create(cls, config, batch: int, length: int, dtype, kv_heads: int | None = None):
        """A cache for sequences of up to `length` indices (prompt padding included); `dtype`
        int8 stores keys and values as int8 with a float16 scale per token and head."""
        slots = cache_slots(config, length)
        kv = kv_heads or config.num_key_value_heads
        lead = (config.n_layers, batch, kv)
        scales = (jnp.zeros((*lead, slots), SCALE_DTYPE) for _ in "kv") \
            if jnp.dtype(dtype) == jnp.int8 else (None, None)
        return cls(jnp.zeros((*lead, config.head_dim, slots), dtype),
                   jnp.zeros((*lead, slots, config.head_dim), dtype),
                   jnp.full((batch, slots), -1, jnp.int32), *scales)

    @property
    def slots(self) -> int:
        return self.index.shape[1]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


DTYPES = ("int8", "bfloat16", "float16", "float32")


def check_dtype(dtype: str | None) -> str | None:
    """A KV cache dtype name, checked (None: the model's compute dtype)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"kv_cache_dtype={dtype!r}: pick one of {', '.join(DTYPES)}")
    return dtype


SCALE_DTYPE = jnp.float16  # 2 bytes a scale: an int8 cache is (h + 2) / 2h of a bfloat16 one


def cache_slots(config, length: int) -> int:
    """`length` rounded up to a multiple of BLOCK, or the window's rolling buffer when the
    window is shorter. Every cache is then read in blocks of BLOCK keys (or of the whole
    window), whatever its length: a sequence's attention sums in the same order in
    `generate`'s cache and in a server's longer one, so both give the same bits."""
    window = config.sliding_window
    return -(-length // BLOCK) * BLOCK if window is None or length <= window else window


def block_size(slots: int) -> int:
    """Keys per block of the loop over a cache of `slots`: the largest power of two up to BLOCK
    that divides it (a window of odd size is read as one block)."""
    size = min(BLOCK, slots & -slots)
    return size if size >= 16 else slots


def blocks_in_use(cache: KVCache, rows: jax.Array | None = None) -> jax.Array:
    """How many blocks of the cache (of its batch rows `rows`, default all) hold anything: the
    loop in `attend_cached` reads only those, so a step costs what the sequences hold, not what
    the cache could hold."""
    size = block_size(cache.slots)
    index = cache.index if rows is None else cache.index[rows]
    used = jnp.max(jnp.where(index >= 0, jnp.arange(cache.slots) + 1, 0))
    return (used + size - 1) // size


def sequence_indices(start: jax.Array, c: int) -> jax.Array:
    """The sequence indices of a chunk of `c` tokens: [c] from a scalar `start` (every row
    left-aligned), [b, c] from a per-row `start` [b]."""
    return jnp.asarray(start)[..., None] + jnp.arange(c, dtype=jnp.int32)


def chunk_indices(start: jax.Array, valid: jax.Array) -> jax.Array:
    """[b, c] sequence indices of a chunk starting at `start` (a scalar, or [b]: one per row),
    -1 where `valid` is 0 (padding)."""
    return jnp.where(valid.astype(bool), sequence_indices(start, valid.shape[1]), -1)


def attend_cached(q, cache: KVCache, layer, blocks, k_new, v_new, new_index, query_index,
                  window, rows: jax.Array | None = None):
    """A chunk's attention over layer `layer` of the cache as it was plus the chunk's own keys:
    the chunk's keys first, then a loop over only the cache's first `blocks` blocks
    (`blocks_in_use`), one softmax carried across them (flash attention's running maximum and
    sum). (XLA's CPU backend still copies each block out of the cache before its matmuls.) (The
    first chunk of a sequence, whose cache holds nothing yet, attends to itself alone:
    `Decoder.step`.)

    q: [b, c, n, h]; k_new/v_new: [b, c, kv, h], new_index: [b, c] (-1: padding);
    query_index: [c], or [b, c] when each row is at its own index; `rows` [b]: the cache's
    batch row each query row reads (default: row i reads row i, and the cache has b rows). A
    query that may see no key (padding) gets an average, never NaN.
    """
    b, c, kv, h = k_new.shape
    f32, lowest = jnp.float32, jnp.finfo(jnp.float32).min
    i = query_index[..., None]  # [c, 1] or [b, c, 1]
    q = L.group_queries(q, kv)  # [b, kv, g * c, h]

    def scores(keys, key_index, key_scale=None):  # keys [b, kv, h, s], key_index [b, s]
        key_index = key_index[:, None, :]  # -> [b, kv, g * c, s]
        mask = (key_index >= 0) & (key_index <= i)  # [b, c, s]
        if window is not None:
            mask &= i - key_index < window
        s = jnp.einsum("bkqh,bkhs->bkqs", q, keys, preferred_element_type=f32)
        if key_scale is not None:
            s = s * key_scale
        s = jnp.where(mask[:, None, None], s.reshape(b, kv, -1, *mask.shape[1:]), lowest)
        return s.reshape(b, kv, -1, key_index.shape[-1])

    def weigh(s, values, m, value_scale=None):  # (sum of exp(s - m), their values' sum)
        p = jnp.exp(s - m)  # for a running maximum m
        weights = p if value_scale is None else p * value_scale
        return p.sum(-1, keepdims=True), jnp.einsum("bkqs,bksh->bkqh",
                                                     weights.astype(values.dtype), values,
                                                     preferred_element_type=f32)

    s = scores(jnp.transpose(k_new, (0, 2, 3, 1)), new_index)
    m = s.max(-1, keepdims=True)
    total, out = weigh(s, jnp.swapaxes(v_new, 1, 2), m)
    size = block_size(cache.slots)

    def read(x, at, size):  # layer `layer`'s block at `at` of each row: [b, *size]
        if rows is None:
            return jax.lax.dynamic_slice(x, (layer, 0, *at), (1, b, *size))[0]
        one = lambda r: jax.lax.dynamic_slice(x, (layer, r, *at), (1, 1, *size))[0, 0]  # noqa: E731
        return jax.vmap(one)(rows)  # one gather of the rows' blocks

    def block(j, carry):
        m, total, out = carry
        at = j * size
        keys = read(cache.k, (0, 0, at), (kv, h, size))
        values = read(cache.v, (0, at, 0), (kv, size, h))
        key_scale = value_scale = None
        if cache.k_scale is not None:  # int8: a key's scale multiplies its scores, a value's
            #                            scale its probabilities (no float copy of the block)
            key_scale, value_scale = (read(x, (0, at), (kv, size)).astype(f32)[:, :, None, :]
                                      for x in (cache.k_scale, cache.v_scale))
            keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        index = cache.index if rows is None else cache.index[rows]
        s = scores(keys, jax.lax.dynamic_slice_in_dim(index, at, size, axis=1), key_scale)
        new_m = jnp.maximum(m, s.max(-1, keepdims=True))
        scale = jnp.exp(m - new_m)
        more, seen = weigh(s, values, new_m, value_scale)
        return new_m, total * scale + more, out * scale + seen

    _, total, out = jax.lax.fori_loop(0, blocks, block, (m, total, out))
    return L.ungroup((out / total).astype(v_new.dtype), c)


def write(cache: KVCache, k, v, new_index, start, rows: jax.Array | None = None) -> KVCache:
    """Every layer's chunk k/v [layers, b, c, kv, h] and indices written at slot `start mod slots`
    (in place when the cache is donated; chunks never wrap, see `generation.prefill_chunks`).
    A per-row `start` [b] writes each row at its own slot; `rows` [b] (with a per-row start):
    the cache rows written (default: 0 .. b - 1)."""
    slot = start % cache.slots
    k_scale = v_scale = None
    if cache.k_scale is not None:
        (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
    k = jnp.transpose(k, (0, 1, 3, 4, 2)).astype(cache.k.dtype)  # [layers, b, kv, h, c]
    v = jnp.swapaxes(v, 2, 3).astype(cache.v.dtype)  # [layers, b, kv, c, h]
    if jnp.ndim(start) == 0:
        at = lambda x, y, i: jax.lax.dynamic_update_slice(  # noqa: E731
            x, y, (0,) * i + (slot,) + (0,) * (x.ndim - i - 1))
        scales = (None, None) if k_scale is None else (at(cache.k_scale, k_scale, 3),
                                                      at(cache.v_scale, v_scale, 3))
        return KVCache(at(cache.k, k, 4), at(cache.v, v, 3), at(cache.index, new_index, 1),
                       *scales)
    # a scatter at [row, slot + j] of every layer and head, in place: mapping a row's
    # dynamic_update_slice over the batch instead moved the whole cache's batch axis (8
    # concurrent SmolLM2 requests of 64 tokens through the engine: 71 s with it, 49 s without)
    c = new_index.shape[1]
    rows = (jnp.arange(new_index.shape[0]) if rows is None else rows)[:, None]  # [b, 1]
    slots = slot[:, None] + jnp.arange(c)  # [b, c]
    scales = (None, None) if k_scale is None else (
        cache.k_scale.at[:, rows, :, slots].set(jnp.moveaxis(k_scale, (1, 3), (0, 1))),
        cache.v_scale.at[:, rows, :, slots].set(jnp.moveaxis(v_scale, (1, 3), (0, 1))))
    return KVCache(cache.k.at[:, rows, :, :, slots].set(jnp.moveaxis(k, (1, 4), (0, 1))),
                   cache.v.at[:, rows, :, slots, :].set(jnp.moveaxis(v, (1, 3), (0, 1))),
                   cache.index.at[rows, slots].set(new_index), *scales)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Chunk keys or values [layers, b, c, kv, h] -> (int8 [layers, b, kv, c, h], scales
    [layers, b, kv, c]): each token's head vector scaled so that its largest entry is 127."""
    x = jnp.swapaxes(x, 2, 3).astype(jnp.float32)
    scale = (jnp.max(jnp.abs(x), axis=-1) / 127.0).astype(SCALE_DTYPE)
    exact = scale.astype(jnp.float32)  # divide by the scale as stored
    values = jnp.clip(jnp.round(x / jnp.where(exact > 0, exact, 1.0)[..., None]), -127, 127)
    return jnp.swapaxes(values.astype(jnp.int8), 2, 3), scale
