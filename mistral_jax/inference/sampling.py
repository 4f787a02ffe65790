"""Choosing the next token from logits, in transformers' order: repetition penalty, then
temperature, top-k and top-p (nucleus, Holtzman et al. 2019); temperature 0 is greedy."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be a positive int or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] or None")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL's repetition penalty (Keskar et al. 2019): tokens already in the sequence get their
    logit divided by `penalty` when positive, multiplied when negative."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def keep_top_k(logits: jax.Array, k) -> jax.Array:
    """Logits [b, vocab] outside each row's k most likely set to -inf; `k` an int (static), or
    [b] ints, one per row (>= vocab keeps every token)."""
    if isinstance(k, int):
        kth = jax.lax.top_k(logits, k)[0][:, -1:]
    else:
        top = -jnp.sort(-logits, axis=-1)
        kth = jnp.take_along_axis(top, jnp.clip(k, 1, logits.shape[-1])[:, None] - 1, axis=-1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def keep_top_p(logits: jax.Array, p) -> jax.Array:
    """Logits [b, vocab] outside each row's nucleus of mass `p` set to -inf (the most likely token
    is always kept); `p` a float, or [b, 1] floats, one per row."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, seen: jax.Array, s: Sampling) -> jax.Array:
    """Next tokens [b] from logits [b, vocab] float32; `seen` [b, vocab] marks tokens so far."""
    if s.repetition_penalty is not None and s.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, seen, s.repetition_penalty)
    if s.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        logits = keep_top_k(logits, s.top_k)
    if s.top_p is not None and s.top_p < 1.0:
        logits = keep_top_p(logits, s.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSampling:
    """Sampling options as arrays over rows [b] (continuous batching: one request per row, no
    recompilation when they change). Off values: top_k 0, top_p 1, repetition_penalty 1."""

    temperature: jax.Array  # float32; 0: greedy
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    repetition_penalty: jax.Array  # float32

    @classmethod
    def of(cls, rows: list[Sampling]) -> RowSampling:
        return cls(np.array([s.temperature for s in rows], np.float32),
                   np.array([s.top_k or 0 for s in rows], np.int32),
                   np.array([1.0 if s.top_p is None else s.top_p for s in rows], np.float32),
                   np.array([s.repetition_penalty or 1.0 for s in rows], np.float32))


def sample_rows(logits: jax.Array, keys: jax.Array, seen: jax.Array, s: RowSampling):
    """`sample` with each row's own options and PRNG key (keys [b]): next tokens [b]. A greedy
    row (temperature 0) is the argmax `sample` takes, to the bit (a penalty of 1 is exact)."""
    logits = penalize_repeats(logits, seen, s.repetition_penalty[:, None])
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warm = s.temperature > 0
    vocab = logits.shape[-1]
    # The sorts run only when some sampled row asks for them: over SmolLM2's 49152 tokens they
    # cost 0.2 s a step on a CPU. Skipped, they would have changed nothing.
    when = lambda needed, fn, x: jax.lax.cond(jnp.any(warm & needed), fn, lambda y: y, x)  # noqa: E731

    def draw(logits):
        logits = logits / jnp.where(warm, s.temperature, 1.0)[:, None]
        k = jnp.where(s.top_k > 0, s.top_k, vocab)
        logits = when(k < vocab, lambda x: keep_top_k(x, k), logits)
        logits = when(s.top_p < 1.0, lambda x: jnp.where(
            (s.top_p < 1.0)[:, None], keep_top_p(x, s.top_p[:, None]), x), logits)
        return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(warm), draw, lambda _: greedy, logits)
    return jnp.where(warm, drawn, greedy)
