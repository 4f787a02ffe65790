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

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from mistral_jax import kernels
from mistral_jax.nn import dense

# Keys read per trip of the loop over a cache (see `attend_cached`).
BLOCK = 256
# Chunks of up to this many tokens (decode steps; short chunks) attend in the CPU kernel.
KERNEL_QUERIES = 16


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    k: jax.Array  # [layers, b, kv_heads, head_dim, slots]: keys transposed, slots minor, so a
    #               query's scores are one matrix product that writes the slots contiguously
    v: jax.Array  # [layers, b, kv_heads, slots, head_dim]
    index: jax.Array  # [b, slots] int32: the sequence index each slot holds, -1 if none
    # int8 caches: each key's and value's scale per head, float32 [layers, b, kv_heads, slots]
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    # a 16-bit float cache keeps its keys and values as their bits (uint16): XLA:CPU reads
    # (slices, gathers) 16-bit floats by converting the whole array to float32 first, which
    # it hoisted out of the layer loop: every step converted the whole cache
    bits_of: str | None = field(default=None, metadata={"static": True})

    @classmethod
    def create(cls, config, batch: int, length: int, dtype, kv_heads: int | None = None):
        """A cache for sequences of up to `length` indices (prompt padding included); `dtype`
        int8 stores keys and values as int8 with a float32 scale per token and head."""
        slots = cache_slots(config, length)
        kv = kv_heads or config.num_key_value_heads
        lead = (config.n_layers, batch, kv)
        dtype = jnp.dtype(dtype)
        scales = (jnp.zeros((*lead, slots), SCALE_DTYPE) for _ in "kv") \
            if dtype == jnp.int8 else (None, None)
        bits = dtype.name if dtype.itemsize == 2 else None
        stored = jnp.uint16 if bits else dtype
        return cls(jnp.zeros((*lead, config.head_dim, slots), stored),
                   jnp.zeros((*lead, slots, config.head_dim), stored),
                   jnp.full((batch, slots), -1, jnp.int32), *scales, bits)

    @property
    def slots(self) -> int:
        return self.index.shape[1]

    @property
    def dtype(self):
        """What the keys and values are (int8, a float)."""
        return jnp.dtype(self.bits_of) if self.bits_of else self.k.dtype

    def stored(self, x: jax.Array) -> jax.Array:
        """Keys or values of the cache's dtype as the cache keeps them."""
        x = x.astype(self.dtype)
        return jax.lax.bitcast_convert_type(x, jnp.uint16) if self.bits_of else x

    def read(self, x: jax.Array) -> jax.Array:
        """Keys or values as kept (a slice of `k` or `v`) back in the cache's dtype."""
        return jax.lax.bitcast_convert_type(x, self.dtype) if self.bits_of else x

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


DTYPES = ("int8", "bfloat16", "float16", "float32")


def check_dtype(dtype: str | None) -> str | None:
    """A KV cache dtype name, checked (None: the model's compute dtype)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"kv_cache_dtype={dtype!r}: pick one of {', '.join(DTYPES)}")
    return dtype


SCALE_DTYPE = jnp.float32  # an int8 cache is (h + 4) / 2h of a bfloat16 one


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


def rows_of(x: jax.Array, first, b: int, axis: int) -> jax.Array:
    """Batch rows first .. first + b - 1 of a cache array (a slice: XLA:CPU reads a bfloat16
    slice as it is, where it converted the whole cache to float32 for a gather of rows)."""
    return x if first is None and b == x.shape[axis] else \
        jax.lax.dynamic_slice_in_dim(x, 0 if first is None else first, b, axis)


def blocks_in_use(cache: KVCache, b: int | None = None, first=None) -> jax.Array:
    """How many blocks of the cache (of its batch rows first .. first + b - 1; default all)
    hold anything: the loop in `attend_cached` reads only those, so a step costs what the
    sequences hold, not what the cache could hold."""
    size = block_size(cache.slots)
    index = rows_of(cache.index, first, b or cache.index.shape[0], 0)
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
                  window, first=None, kernel: bool = False):
    """A chunk's attention over layer `layer` of the cache as it was plus the chunk's own keys:
    the chunk's keys first, then a loop over only the cache's first `blocks` blocks
    (`blocks_in_use`), one softmax carried across them (flash attention's running maximum and
    sum). (XLA's CPU backend still copies each block out of the cache before its matmuls.) (The
    first chunk of a sequence, whose cache holds nothing yet, attends to itself alone:
    `Decoder.step`.)

    q: [b, c, n, h]; k_new/v_new: [b, c, kv, h], new_index: [b, c] (-1: padding);
    query_index: [c], or [b, c] when each row is at its own index; the query rows are the
    cache's batch rows first .. first + b - 1 (default: the first b). A query that may see no
    key (padding) gets an average, never NaN. `kernel`: on a CPU, a chunk of up to
    KERNEL_QUERIES tokens (a decode step) goes to `kernels.attention`, which reads the cache
    where it lies, only the slots in use (a padding query then gets zeros).
    """
    b, c, kv, h = k_new.shape
    if kernel and c <= KERNEL_QUERIES:
        out = kernels.attention(q, cache.k, cache.v, cache.k_scale, cache.v_scale, cache.index,
                                layer, 0 if first is None else first, k_new, v_new, new_index,
                                query_index, kv_type=cache.dtype.name, window=window)
        return out.astype(v_new.dtype)
    f32, lowest = jnp.float32, jnp.finfo(jnp.float32).min
    i = query_index[..., None]  # [c, 1] or [b, c, 1]
    q = dense.group_queries(q, kv)  # [b, kv, g * c, h]

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
        row = 0 if first is None else first
        return jax.lax.dynamic_slice(x, (layer, row, *at), (1, b, *size))[0]

    def block(j, carry):
        m, total, out = carry
        at = j * size
        keys = cache.read(read(cache.k, (0, 0, at), (kv, h, size)))
        values = cache.read(read(cache.v, (0, at, 0), (kv, size, h)))
        key_scale = value_scale = None
        if cache.k_scale is not None:  # int8: a key's scale multiplies its scores, a value's
            #                            scale its probabilities (no float copy of the block)
            key_scale, value_scale = (read(x, (0, at), (kv, size)).astype(f32)[:, :, None, :]
                                      for x in (cache.k_scale, cache.v_scale))
            keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        index = rows_of(cache.index, first, b, 0)
        s = scores(keys, jax.lax.dynamic_slice_in_dim(index, at, size, axis=1), key_scale)
        new_m = jnp.maximum(m, s.max(-1, keepdims=True))
        scale = jnp.exp(m - new_m)
        more, seen = weigh(s, values, new_m, value_scale)
        return new_m, total * scale + more, out * scale + seen

    _, total, out = jax.lax.fori_loop(0, blocks, block, (m, total, out))
    return dense.ungroup((out / total).astype(v_new.dtype), c)


def write(cache: KVCache, k, v, new_index, start, first=None) -> KVCache:
    """Every layer's chunk k/v [layers, b, c, kv, h] and indices written at slot `start mod slots`
    (in place when the cache is donated; chunks never wrap, see `inference.chunks.prefill_chunks`).
    A per-row `start` [b] writes each row at its own slot, into the cache's batch rows
    first .. first + b - 1 (default: the first b)."""
    slot = start % cache.slots
    k_scale = v_scale = None
    if cache.k_scale is not None:
        (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
    k = cache.stored(jnp.transpose(k, (0, 1, 3, 4, 2)))  # [layers, b, kv, h, c]
    v = cache.stored(jnp.swapaxes(v, 2, 3))  # [layers, b, kv, c, h]
    if jnp.ndim(start) == 0:
        at = lambda x, y, i: jax.lax.dynamic_update_slice(  # noqa: E731
            x, y, (0,) * i + (slot,) + (0,) * (x.ndim - i - 1))
        scales = (None, None) if k_scale is None else (at(cache.k_scale, k_scale, 3),
                                                      at(cache.v_scale, v_scale, 3))
        return KVCache(at(cache.k, k, 4), at(cache.v, v, 3), at(cache.index, new_index, 1),
                       *scales, cache.bits_of)
    # each row's chunk put in place at its row and slot, one row after another: as a scatter,
    # XLA:CPU converted a whole bfloat16 (or float16 scales') cache to float32 and back every
    # step (a served SmolLM2 in bfloat16: 3.6 tokens/s); mapping a row's
    # dynamic_update_slice over the batch moved the whole cache's batch axis instead
    rows = jnp.arange(new_index.shape[0]) + (0 if first is None else first)
    parts = [(k, 1, 4), (v, 1, 3), (new_index, 0, 1)]
    if k_scale is not None:
        parts += [(k_scale, 1, 3), (v_scale, 1, 3)]

    def put_row(j, arrays):
        out = []
        for x, (y, row_axis, slot_axis) in zip(arrays, parts, strict=True):
            at = [0] * x.ndim
            at[row_axis], at[slot_axis] = rows[j], slot[j]
            out.append(jax.lax.dynamic_update_slice(
                x, jax.lax.dynamic_slice_in_dim(y, j, 1, row_axis), at))
        return out

    new = jax.lax.fori_loop(0, rows.shape[0], put_row,
                            [cache.k, cache.v, cache.index, cache.k_scale, cache.v_scale]
                            [:len(parts)])
    return KVCache(*new[:2], new[2], *(new[3:] or (None, None)), cache.bits_of)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Chunk keys or values [layers, b, c, kv, h] -> (int8 [layers, b, kv, c, h], scales
    [layers, b, kv, c]): each token's head vector scaled so that its largest entry is 127."""
    x = jnp.swapaxes(x, 2, 3).astype(jnp.float32)
    scale = (jnp.max(jnp.abs(x), axis=-1) / 127.0).astype(SCALE_DTYPE)
    exact = scale.astype(jnp.float32)  # divide by the scale as stored
    values = jnp.clip(jnp.round(x / jnp.where(exact > 0, exact, 1.0)[..., None]), -127, 127)
    return jnp.swapaxes(values.astype(jnp.int8), 2, 3), scale
