"""What a query may see, as every attention implementation takes it (`Masking`), and how a
kernel gets its own device's share of it under a mesh (`per_device`).

Query `i` sees key `j` when `j <= i`, `i - j < window` (transformers' rule), `j` is not padding
and both are in one document.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mistral_jax.parallel.sharding import MODEL, batch_axes


class Masking(NamedTuple):
    """What a query may see, besides causality: `valid` [b, t] (False: padding), `segments`
    [b, t] (packed documents) or None, `window` (static) or None."""

    valid: jax.Array
    segments: jax.Array | None
    window: int | None

    def dense(self) -> jax.Array:
        """The [b, t, t] boolean mask (the xla path)."""
        return attention_mask_bts(self.valid, self.window, self.segments)


def attention_mask_bts(attention_mask: jax.Array, sliding_window: int | None,
                       segment_ids: jax.Array | None = None) -> jax.Array:
    """Boolean [b, t, s] mask: causal, within the window (0 <= i - j < window, as HF), not padding,
    and, with `segment_ids` [b, t], within the query's own segment (packed documents).

    Query and key indices are positions in the (padded) sequence, as in transformers.
    """
    t = attention_mask.shape[-1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= i - j < sliding_window
    allowed = allowed[None] & attention_mask[:, None, :].astype(bool)
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return allowed


def per_device(fn, q, k, v, masking: Masking):
    """`fn(q, k, v, valid, segments)` on each device's own batch rows and heads under a mesh
    (`shard_map`), so no communication is added: the heads stay where the tensor-parallel
    layout put them. Without packed documents every token is in document 0."""
    b, kv = q.shape[0], k.shape[2]
    segments = masking.segments
    if segments is None:
        segments = jnp.zeros((b, q.shape[1]), jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, masking.valid, segments)
    data = batch_axes(mesh, b)
    model = MODEL if kv % mesh.shape[MODEL] == 0 else None
    heads, rows = P(data, None, model, None), P(data, None)
    return jax.shard_map(fn, in_specs=(heads, heads, heads, rows, rows), out_specs=heads,
                         check_vma=False)(q, k, v, masking.valid, segments)


def pad_to_blocks(size: int, q, k, v, valid, segments):
    """The sequence axis (1) padded to a multiple of `size`: keys that are padding, queries in
    document -1 (nothing real sees them)."""
    pad = -(-q.shape[1] // size) * size - q.shape[1]
    if not pad:
        return q, k, v, valid, segments
    seq = lambda a, value=0: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),
                                     constant_values=value)
    return seq(q), seq(k), seq(v), seq(valid), seq(segments, -1)
