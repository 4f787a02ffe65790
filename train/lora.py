"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): each targeted
weight W is used as W + (alpha / r) A B with A [in, r] random and B [r, out] zero, and only A and
B are trained. The sum is formed once per step from the stacked weights, so the model code is
unchanged; `merge` writes it into the weights for good.

A and B take their sharding from W's logical axes: for a column-parallel W (q, gate) B is split
like W's output and A is replicated; for a row-parallel W (o, down) A is split like W's input.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from mistral_jax import sharding

TARGETS = {"mistral": ("q", "k", "v", "o", "gate", "up", "down"),
           "gpt2": ("q", "k", "v", "o", "fc", "proj")}
INPUT_AXES = {"o": 2}  # o is [heads, head_dim, embed]: two input axes; every other weight one


class LoraError(ValueError):
    pass


def check_targets(targets: list[str], model_type: str) -> None:
    known = TARGETS[model_type]
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        raise LoraError(f"--lora-targets {','.join(targets)}: {model_type} weights that LoRA can "
                        f"target are {','.join(known)}")


def _split(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input dims, output dims) of a stacked weight [layers, *in, *out]."""
    n_in = INPUT_AXES.get(name, 1)
    return shape[1:1 + n_in], shape[1 + n_in:]


def init(weights: dict, axes: dict, targets: list[str], rank: int, seed: int, mesh=None) -> dict:
    """{"layers": {name: {"a": [L, *in, r], "b": [L, r, *out]}}} for each target, float32."""
    adapters, keys = {}, iter(jax.random.split(jax.random.key(seed), len(targets)))
    for name in targets:
        w, names = weights["layers"][name], axes["layers"][name]
        ins, outs = _split(name, w.shape)
        n_in = len(ins)
        a_shape, b_shape = (w.shape[0], *ins, rank), (w.shape[0], rank, *outs)
        a = jax.random.normal(next(keys), a_shape, jnp.float32) / math.sqrt(math.prod(ins))
        b = jnp.zeros(b_shape, jnp.float32)
        if mesh is not None:
            a_axes, b_axes = (*names[:1 + n_in], None), (names[0], None, *names[1 + n_in:])
            a = jax.device_put(a, NamedSharding(mesh, sharding.spec_for(a_axes, a_shape, mesh)))
            b = jax.device_put(b, NamedSharding(mesh, sharding.spec_for(b_axes, b_shape, mesh)))
        adapters[name] = {"a": a, "b": b}
    return {"layers": adapters}


def delta(name: str, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A B for a stacked weight: [L, *in, r] x [L, r, *out] -> [L, *in, *out]."""
    n_in = a.ndim - 2
    letters = "ijklmn"
    ins, outs = letters[:n_in], letters[n_in: n_in + b.ndim - 2]
    return scale * jnp.einsum(f"z{ins}r,zr{outs}->z{ins}{outs}", a, b)


def merge(base: dict, adapters: dict, scale: float) -> dict:
    """The weights with each adapter's product added (a new dict; `base` is untouched)."""
    layers = dict(base["layers"])
    for name, ab in adapters["layers"].items():
        w = layers[name]
        layers[name] = (w + delta(name, ab["a"], ab["b"], scale).astype(w.dtype)).astype(w.dtype)
    return {**base, "layers": layers}
