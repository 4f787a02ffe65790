"""Where a model's weights live on a mesh, worked out once per model and mesh: each weight's
`NamedSharding` from the sharding rules, and Megatron's vocab padding (`Placement`); and
`onto`, which moves a model's weights there (`model.registry.shard` also sets its options).

A vocab the model axis does not divide is padded (to a multiple of 128 x T, as Megatron). On the
way in, the unpadded tables are sharded on `embed` over fsdp x model instead, so that no device
ever holds a whole one; the padding then happens on device.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.base import trees
from mistral_jax.parallel.sharding import (
    FSDP,
    MODEL,
    WEIGHTS,
    axis_size,
    check_layout,
    padded_vocab_size,
    spec_for,
    split_over,
)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A model's weights on a mesh: `shardings` for the vocab-padded model it becomes,
    `incoming` for its weights as a checkpoint stores them (the real vocab)."""

    vocab_padded: int
    shardings: dict  # nested like the weights: each a NamedSharding
    incoming: dict


def place(model, mesh: Mesh) -> Placement:
    """The placement of `model` (abstract or not, padded or not) on `mesh`; raises
    `ShardingError` for a layout the mesh cannot split."""
    config, tp = model.config, mesh.shape[MODEL]
    check_layout(config, tp, axis_size(mesh, FSDP))
    padded = padded_vocab_size(config.vocab_size, tp)
    axes = trees.logical_axes(model)
    shapes = jax.tree.map(lambda x: x.shape, trees.weights(model))
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731

    def with_vocab(shape, names, size):
        return tuple(size if n == "vocab" else s for s, n in zip(shape, names, strict=True))

    def target(names, shape):
        return NamedSharding(mesh, spec_for(names, with_vocab(shape, names, padded), mesh,
                                            WEIGHTS))

    def incoming(names, shape):
        shape = with_vocab(shape, names, config.vocab_size)
        if "vocab" in names:  # T does not divide the real vocab: shard the other axis
            both = (FSDP, MODEL)
            return NamedSharding(mesh, P(*[split_over(
                mesh, both if s % axis_size(mesh, both) == 0 else FSDP) if n == "embed" else None
                for s, n in zip(shape, names, strict=True)]))
        return NamedSharding(mesh, spec_for(names, shape, mesh, WEIGHTS))

    shardings = jax.tree.map(target, axes, shapes, is_leaf=is_axes)
    if padded == config.vocab_size:
        return Placement(padded, shardings, shardings)
    return Placement(padded, shardings, jax.tree.map(incoming, axes, shapes, is_leaf=is_axes))


def onto(model, placement: Placement, *, donate: bool = False):
    """`model`'s weights moved (and their vocab padded) as `placement` says."""
    axes = trees.logical_axes(model)
    resize = jax.jit(lambda w: trees.resize_vocab(w, axes, placement.vocab_padded),
                     out_shardings=placement.shardings, donate_argnums=0 if donate else ())
    with warnings.catch_warnings():  # donated vocab tables change shape, so are not reused
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        return trees.with_weights(model, resize(trees.weights(model)))
