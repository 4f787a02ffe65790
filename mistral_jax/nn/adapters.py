"""LoRA adapters carried by a model beside its weights, unmerged: the layer body gets each
layer's A and B slices with its weights (the scan slices them alike) and `layers.project` adds
scale (x A) B to x W (`layers.Adapted`).

Where merging is exact and cheap (a float base at load) `io/lora` merges instead; adapters stay
beside the weights where merging would not do: over an int8 base (QLoRA: W + scale A B is not
int8, and requantizing it would round most of the adapters' change away), and in LoRA training,
where the backward pass of a merged weight computes a full-size gradient of W for every target.

The arrays are `Adapter` variables, not `nnx.Param`s, so what reads a model's weights
(`trees.weights`: saving, quantizing, sharding rules, merging) leaves them out.
"""

from __future__ import annotations

from flax import nnx

from mistral_jax.nn.layers import Adapted

ATTRIBUTE = "lora"  # the stacked layers' attribute that holds them: model.layers.lora.q.a


class Adapter(nnx.Variable):
    """A or B of a LoRA adapter, stacked on the layers axis like the weight it adapts."""


class Pair(nnx.Module):
    def __init__(self, a, b):
        self.a, self.b = Adapter(a), Adapter(b)


class Adapters(nnx.Module):
    """The adapters of a model's stacked weights: for each target (the short name of a weight,
    "q"), A [L, *in, r] and B [L, r, *out], and the scale alpha / r (static)."""

    def __init__(self, tree: dict, scale: float):
        self.scale = float(scale)
        for name, ab in tree.items():
            setattr(self, name, Pair(ab["a"], ab["b"]))


def adapt(lora: Adapters | None, name: str, weight, index=None):
    """`weight` (as `layers.project` takes it) with `name`'s adapter beside it, if `lora` has
    one; `index`: the layer, when `lora` holds every layer (the decode step's kernel path)."""
    pair = getattr(lora, name, None) if lora is not None else None
    if pair is None:
        return weight
    a, b = pair.a[...], pair.b[...]
    if index is not None:
        a, b = a[index], b[index]
    return Adapted(weight, a, b, lora.scale)


def attach(model, tree: dict, scale: float):
    """A new model holding `model`'s arrays (no copy) and the adapters `tree`
    ({name: {"a", "b"}}, arrays or `jax.ShapeDtypeStruct`s) beside its stacked weights."""
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)
    setattr(new.layers, ATTRIBUTE, Adapters(tree, scale))
    return new


def attached(model) -> Adapters | None:
    return getattr(model.layers, ATTRIBUTE, None)

