"""A model's weights as plain trees: the nested dict of arrays that is saved, trained and
sharded ({"embed": ..., "layers": {"q": ...}}), the logical axes of each, dotted flat names, and
Megatron's vocab padding applied to such a tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def weights(model: nnx.Module) -> dict:
    """The nested dict of weight arrays ({"embed": ..., "layers": {"q": ...}}), as saved."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_weights(model: nnx.Module, tree: dict) -> nnx.Module:
    """A copy of `model` (abstract or not) holding the arrays of the nested dict `tree`."""
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state)


def logical_axes(model: nnx.Module) -> dict:
    """The nested dict of each weight's logical axes (the `axes` metadata of its Param)."""
    state = nnx.state(model, nnx.Param)
    axes = jax.tree.map(lambda p: p.get_metadata()["axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"layers": {"q": x}} -> {"layers.q": x}: the dotted names used in messages and key maps
    (a key that is not a str, as some torch state dicts hold, is named by its str)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def resize_vocab(tree: dict, axes: dict, size: int) -> dict:
    """Cut or zero-pad every weight's `vocab` axis to `size` rows (Megatron's vocab padding)."""

    def resize(x, names):
        if "vocab" not in names:
            return x
        i = names.index("vocab")
        if x.shape[i] >= size:
            return jax.lax.slice_in_dim(x, 0, size, axis=i)
        pad = [(0, 0)] * x.ndim
        pad[i] = (0, size - x.shape[i])
        return jnp.pad(x, pad)

    return jax.tree.map(resize, tree, axes)
