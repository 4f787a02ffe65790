"""The continuous-batching engine's steps on the device (`engine.Engine` drives them): a fixed set
of slots, each a row of one KV cache with the logits of its last token and the tokens its
sequence holds. Every step is jitted over the whole state, donated, and reads the rows it needs
where they lie: prefill one slot's chunk, decode slots 0 .. n - 1, move a slot down into a free
one, forget a freed slot.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp

from mistral_jax.inference.sampling import RowSampling, sample_rows
from mistral_jax.model.cache import KVCache


@jax.tree_util.register_dataclass
@dataclass
class Slots:
    """What stays on the device between steps: a row per slot."""

    cache: KVCache
    logits: jax.Array  # [slots, vocab] of the last token fed
    seen: jax.Array  # [slots, vocab] bool: the tokens of the row's sequence (repetition penalty)


@partial(jax.jit, donate_argnums=(1,), static_argnames=("first",))
def prefill(model, state: Slots, slot, ids, valid, positions, start, first: bool) -> Slots:
    """One chunk [1, c] of the prompt in `slot` (one compilation per chunk length), stepped in
    the slot's cache row where it lies. `first`: the request's first chunk, which attends to
    itself alone, as `generate`'s first chunk does (the same numbers: a served completion
    equals generate's); the slot's previous request is forgotten (its keys masked, its
    tokens unseen)."""
    vocab, cache = state.seen.shape[1], state.cache
    if first:
        cache = replace(cache, index=cache.index.at[slot].set(-1))
    logits, cache = model.step(ids, valid, positions, cache, start[None], fresh=first,
                               first=slot)
    seen = jnp.zeros_like(state.seen[slot]) if first else state.seen[slot]
    seen = seen.at[jnp.where(valid[0] > 0, ids[0], vocab)].set(True, mode="drop")
    return Slots(cache, state.logits.at[slot].set(logits[0, :vocab]),
                 state.seen.at[slot].set(seen))


@partial(jax.jit, donate_argnums=(1,))
def decode(model, state: Slots, live, index, position, seed, count, sampling: RowSampling):
    """Sample the next token of slots 0 .. n - 1 (n = live.shape[0], a width of
    `decode_widths`; the slots not decoding are `live` False), then feed it: (state, tokens
    [n], logprobs [n]). The step does the work of n rows, whatever the number of slots, and
    reads them where they lie. A row's key depends only on its request's seed and the token's
    number."""
    n, vocab = live.shape[0], state.seen.shape[1]
    logits, seen = state.logits[:n], state.seen[:n]
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed, count)
    token = jnp.where(live, sample_rows(logits, keys, seen, sampling), 0)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)
    logits, cache = model.step(token[:, None], live[:, None].astype(jnp.int32),
                               position[:, None], state.cache, index)
    seen = seen.at[jnp.arange(n), jnp.where(live, token, vocab)].set(True, mode="drop")
    return (Slots(cache, state.logits.at[:n].set(logits[:, :vocab]), state.seen.at[:n].set(seen)),
            token, logprob[:, 0])


@partial(jax.jit, donate_argnums=(0,))
def move(state: Slots, src, dst) -> Slots:
    """Slot `src`'s row (its cache, logits, tokens seen) moved to the free slot `dst`, `src`
    left empty: the slots decoding stay at the front, so a step's width stays theirs."""
    def row(x, axis):
        part = jax.lax.dynamic_slice_in_dim(x, src, 1, axis)
        return jax.lax.dynamic_update_slice_in_dim(x, part, dst, axis)

    cache = jax.tree.map(lambda x: row(x, 0 if x.ndim == 2 else 1), state.cache)
    cache = replace(cache, index=cache.index.at[src].set(-1))
    return Slots(cache, row(state.logits, 0), row(state.seen, 0))


@partial(jax.jit, donate_argnums=(0,))
def forget(state: Slots, slot) -> Slots:
    """A freed slot's cache row marked empty, so the steps after it do not read it."""
    cache = replace(state.cache, index=state.cache.index.at[slot].set(-1))
    return Slots(cache, state.logits, state.seen)


def decode_widths(max_batch: int) -> list[int]:
    """The row counts the decode step compiles for: powers of two below `max_batch`, and
    `max_batch` (a step over n live slots runs at the smallest width >= n)."""
    return [w for w in (1 << i for i in range(max_batch.bit_length())) if w < max_batch] + \
        [max_batch]
