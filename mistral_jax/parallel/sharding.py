"""Megatron-LM's tensor parallelism (Shoeybi et al. 2019) and fully sharded data parallelism as
sharding rules over a ("data", "fsdp", "model") mesh, with no hand-written communication.

Each weight carries logical axis names (see `layers.ParamMaker`); one `ShardingRules` table maps
them to mesh axes. The Megatron layout follows: q/k/v and MLP gate/up are column-parallel (output
sharded over `model`), attention `o` and MLP down are row-parallel (input sharded, so XLA adds one
all-reduce after each), the embedding and LM head are vocab-parallel. Activations between the
blocks are replicated over `model` and sharded over `data` on the batch.

| weight                      | logical axes           | mesh            |
|-----------------------------|------------------------|-----------------|
| embed `[vocab, d]`          | vocab, embed           | model, -        |
| q/k/v `[d, heads, h]`       | embed, (kv_)heads, -   | -, model, -     |
| o `[heads, h, d]`           | heads, -, embed        | model, -, -     |
| MLP gate/up `[d, f]`        | embed, mlp             | -, model        |
| MLP down `[f, d]`           | mlp, embed             | model, -        |
| LM head `[d, vocab]`        | embed, vocab           | -, model        |
| norms, row-parallel biases  | embed                  | replicated      |

Grouped-query attention with fewer kv heads than the model axis: the k/v weights are replicated
and each device repeats the kv heads so that it holds the one its query heads use (as Megatron).

Fully sharded data parallelism (FSDP, ZeRO-3; Rajbhandari et al. 2020) is a third mesh axis,
`fsdp`: data parallelism whose F replicas each hold 1/F of every weight, split on the `embed`
axis, the one every weight has and the tensor-parallel rules leave whole (`WEIGHTS`). The batch
is split over data x fsdp. Nothing else is written for it: inside the scan over layers XLA
all-gathers each layer's weights where the batch-sharded activations meet them, and
reduce-scatters their gradients back to the shards; the optimizer state follows the weights.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.base.notes import note

DATA, FSDP, MODEL = "data", "fsdp", "model"
BATCH = (DATA, FSDP)  # the mesh axes a batch is split over
MeshAxis = str | tuple[str, ...] | None  # a dimension's mesh axis (or axes), None: replicated


class ShardingError(ValueError):
    """A mesh or layout that cannot work; the message says what to change."""


class MeshShape(NamedTuple):
    data: int  # D: replicas, each with whole weights (over T)
    fsdp: int  # F: replicas that each hold 1/F of the weights
    model: int  # T: tensor parallel

    def __str__(self) -> str:
        return "x".join(map(str, self))


def parse_mesh(spec: str) -> MeshShape:
    """"DxT" or "DxFxT" -> (D, F, T): D-way data parallel, F-way fully sharded data parallel
    (1 in "DxT"), T-way tensor (model) parallel."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*(?:x\s*(\d+)\s*)?", str(spec))
    sizes = [int(g) for g in m.groups() if g is not None] if m else []
    if not sizes or min(sizes) < 1:
        raise ShardingError(f"mesh {spec!r} is not DxT or DxFxT with positive integers, e.g. "
                            "'1x8' (8-way tensor parallel), '2x4' (2-way data, 4-way tensor) or "
                            "'1x8x1' (8-way fully sharded data parallel)")
    return MeshShape(sizes[0], 1, sizes[1]) if len(sizes) == 2 else MeshShape(*sizes)


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("data", "fsdp", "model") mesh for "DxT" or "DxFxT" over `devices` (default: all of
    them; the first D*F*T when there are more, with a note).

    The axes are `Auto`: XLA propagates shardings from the weights and the few constraints the
    model sets, so the model code needs no per-operation sharding annotations.
    """
    shape = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    needed, multi = math.prod(shape), jax.process_count() > 1
    if needed > len(devices) or (needed < len(devices) and multi):
        raise ShardingError(
            f"mesh {spec} needs {needed} devices and {len(devices)} "
            f"{devices[0].platform} devices are there"
            + ("; a multi-process mesh takes every process's devices" if multi else
               f"; pick sizes whose product is at most {len(devices)}"))
    if needed < len(devices):
        note(f"mesh {spec} uses the first {needed} of the {len(devices)} "
             f"{devices[0].platform} devices")
        devices = devices[:needed]
    return jax.make_mesh(tuple(shape), (DATA, FSDP, MODEL), axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _names(axis: MeshAxis) -> tuple[str, ...]:
    return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


def axis_size(mesh, axis: MeshAxis) -> int:
    """How many ways `axis` (a mesh axis name, a tuple of them, or None) splits a dimension;
    axes the mesh does not have count 1."""
    return math.prod(dict(mesh.shape).get(a, 1) for a in _names(axis))


def split_over(mesh, axis: MeshAxis) -> MeshAxis:
    """`axis` without its mesh axes of size 1, which split nothing (so a DxT mesh's specs read
    as they did before the fsdp axis, and equal specs are spelled one way): None, a name or a
    tuple."""
    names = [a for a in _names(axis) if dict(mesh.shape).get(a, 1) > 1]
    return None if not names else names[0] if len(names) == 1 else tuple(names)


def batch_axes(mesh, rows: int) -> MeshAxis:
    """The mesh axes a batch of `rows` is split over: data x fsdp, or data alone (or nothing)
    where the rows do not divide."""
    for axes in (BATCH, DATA):
        if rows % axis_size(mesh, axes) == 0:
            return split_over(mesh, axes)
    return None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (None: replicated). The one table both decoders use.

    `kv_heads` falls back to replicated when the model axis does not divide the kv heads;
    every other sharded axis must divide evenly.
    """

    batch: MeshAxis = BATCH
    sequence: MeshAxis = None
    vocab: MeshAxis = MODEL
    embed: MeshAxis = None
    heads: MeshAxis = MODEL
    kv_heads: MeshAxis = MODEL
    head_dim: MeshAxis = None
    mlp: MeshAxis = MODEL
    layers: MeshAxis = None

    def spec(self, axes: Sequence[str | None]) -> P:
        mesh_axes = [None if a is None else getattr(self, a) for a in axes]
        used = [n for m in mesh_axes if m is not None
                for n in ((m,) if isinstance(m, str) else m)]
        if len(used) != len(set(used)):
            raise ShardingError(f"logical axes {tuple(axes)} map to {tuple(mesh_axes)}: "
                                "one mesh axis may shard only one dimension")
        return P(*mesh_axes)


RULES = ShardingRules()  # the activations'
SEQUENCE_PARALLEL_RULES = ShardingRules(sequence=MODEL)
WEIGHTS = ShardingRules(embed=FSDP)  # the weights': Megatron's, and FSDP on embed


def rules_for(sequence_parallel: bool) -> ShardingRules:
    """The activations' layout: sequence parallel (see `registry.shard`) or Megatron's."""
    return SEQUENCE_PARALLEL_RULES if sequence_parallel else RULES


def platform() -> str:
    """The platform the program being traced is for: that of the mesh set with `jax.set_mesh`
    (train.plan traces a TPU slice's step on a CPU), else the default device's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.devices()[0].platform


def model_axis_size(mesh=None) -> int:
    """The size of `model` on `mesh` (default: the mesh set with `jax.set_mesh`), 1 if none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return dict(mesh.shape).get(MODEL, 1)


def kv_heads_on(kv_heads: int, tp: int) -> int:
    """The kv heads a model computes with on a `tp`-way model axis: with fewer kv heads than
    devices each device repeats the one its query heads use (Megatron), so there are `tp`."""
    return max(kv_heads, tp)


def check_layout(config, tp: int, fsdp: int = 1) -> None:
    """Raise if `config` cannot be split `tp` ways the Megatron way and `fsdp` ways on its
    hidden size."""
    n, kv, f = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if config.hidden_size % fsdp:
        raise ShardingError(f"hidden size {config.hidden_size} is not divisible by the fsdp axis "
                            f"{fsdp}; use a mesh whose F divides {config.hidden_size}")
    if n % tp:
        raise ShardingError(f"num_attention_heads={n} is not divisible by the model axis {tp}; "
                            f"use a mesh whose T divides {n}")
    if kv % tp and tp % kv:
        raise ShardingError(f"num_key_value_heads={kv} and the model axis {tp} do not divide one "
                            f"another, so a device's query heads would need two kv heads; use a "
                            f"T that divides {kv} or is a multiple of it")
    if f % tp:
        raise ShardingError(f"intermediate size {f} is not divisible by the model axis {tp}")


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: ShardingRules = RULES) -> P:
    """The PartitionSpec of one weight, replicating kv heads the model axis does not divide."""
    spec = [split_over(mesh, m) for m in rules.spec(axes)]
    for i, (axis, mesh_axis) in enumerate(zip(axes, spec, strict=True)):
        size = axis_size(mesh, mesh_axis)
        if shape[i] % size:
            if axis != "kv_heads":
                raise ShardingError(f"dimension {axis}={shape[i]} is not divisible by mesh axis "
                                    f"{mesh_axis}={size}")
            spec[i] = None
    return P(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: ShardingRules = RULES):
    """Pin an activation's sharding by logical axes, under the mesh set with `jax.set_mesh`.

    A no-op without a mesh, and on axes the mesh does not divide (a batch of 1 on 2-way data).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = [batch_axes(mesh, x.shape[i]) if m == BATCH else
            split_over(mesh, m) if x.shape[i] % axis_size(mesh, m) == 0 else None
            for i, m in enumerate(rules.spec(axes))]
    return jax.lax.with_sharding_constraint(x, P(*spec))


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Megatron's padding: to a multiple of 128 * tp when tp does not divide the vocab."""
    if vocab_size % tp == 0:
        return vocab_size
    return math.ceil(vocab_size / (128 * tp)) * 128 * tp


def mesh_of(tree) -> Mesh | None:
    """The mesh the (concrete) arrays of `tree` are sharded over, if any."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            sharding = leaf.sharding
            if isinstance(sharding, NamedSharding) and np.prod(sharding.mesh.devices.shape) > 1:
                return sharding.mesh
    return None


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def count_collectives(hlo: str) -> dict[str, int]:
    """How many of each collective a compiled HLO text (`.compile().as_text()`) runs."""
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}
