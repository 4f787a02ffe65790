"""How a weight is laid out in torch and in ours, both ways: the heads axis, RoPE's halves and
the joining of tensor-parallel shards.

A `Layout` is the pair of functions between one torch tensor and our value for it (one array,
or a tuple of arrays where torch fuses several of ours, as GPT-2's `c_attn` fuses q|k|v). Key
maps (convert/mapping/keymaps.py) pair a torch key with our name(s) and a layout; import calls
`to_ours`, export `to_torch`.

Torch `Linear` stores [out, in]; we keep [in, out] and give attention heads an axis of their
own: q/k/v `[d, heads, head_dim]`, o `[heads, head_dim, d]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from mistral_jax.arch import weights
from mistral_jax.arch.configs import Config, model_type


class Layout(NamedTuple):
    """torch tensor -> our value(s), and back (None where a format is read, never written)."""

    to_ours: Callable
    to_torch: Callable | None = None

    def after(self, first: Layout) -> Layout:
        """`first`'s step, then this one (on export: this one undone, then `first`'s)."""
        back = None if self.to_torch is None or first.to_torch is None else \
            lambda w: first.to_torch(self.to_torch(w))
        return Layout(lambda w: self.to_ours(first.to_ours(w)), back)


SAME = Layout(lambda w: w, lambda w: w)


def linear(config: Config, name: str) -> Layout:
    """A torch `Linear` weight [out, in] <-> our matmul weight `name` [*in, *out] (one layer's),
    shaped as arch/weights.py says: q [d, heads, head_dim], o [heads, head_dim, d], gate [d, f]."""
    w = next(w for w in weights.TABLES[model_type(config)] if w.name == name)
    shape = weights.shape(w, config)[w.lead:]
    if len(shape) == 2:  # no axis to split: a tensor of the wrong size keeps its own shape,
        return Layout(lambda t: t.T, lambda x: x.T)  # so the error can name the config field
    k = math.prod(shape[:w.inputs])
    return Layout(lambda t: t.T.reshape(shape), lambda x: x.reshape(k, -1).T)


def rope_halves(heads: int) -> Layout:
    """q/k rows [heads * head_dim, d] in RoPE's interleaved pairs (0, 1), (2, 3), ... (Meta's
    reference code, llama.cpp) <-> in its rotated halves (transformers, ours), as transformers'
    `convert_mistral_weights_to_hf.py` permutes them."""
    def to_halves(w: np.ndarray) -> np.ndarray:
        rows, d = w.shape
        return w.reshape(heads, rows // heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d)

    def to_pairs(w: np.ndarray) -> np.ndarray:
        rows, d = w.shape
        return w.reshape(heads, 2, rows // heads // 2, d).transpose(0, 2, 1, 3).reshape(rows, d)

    return Layout(to_halves, to_pairs)


# --- tensor-parallel shards (Shoeybi et al. 2019, "Megatron-LM"; Llama's release follows it) ---

COLUMN, ROW, REPLICATED = "column", "row", "replicated"


def join_shards(parts: list[np.ndarray], split: str) -> np.ndarray:
    """One tensor from its tensor-parallel shards: a column-parallel weight (its output split)
    joins on dim 0, a row-parallel one (its input split) on dim 1; a replicated one is any
    shard's copy."""
    if len(parts) == 1 or split == REPLICATED:
        return parts[0]
    return np.concatenate(parts, axis=1 if split == ROW else 0)
