"""Megatron-LM's tensor parallelism (Shoeybi et al. 2019) as sharding rules over a
("data", "model") mesh, with no hand-written communication.

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
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.base.notes import note

DATA, MODEL = "data", "model"


class ShardingError(ValueError):
    """A mesh or layout that cannot work; the message says what to change."""


def parse_mesh(spec: str) -> tuple[int, int]:
    """"DxT" -> (D, T): D-way data parallel, T-way tensor (model) parallel."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(spec))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ShardingError(f"mesh {spec!r} is not DxT with positive integers, e.g. '1x8' "
                            "(1-way data, 8-way tensor parallel) or '2x4'")
    return int(m.group(1)), int(m.group(2))


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("data", "model") mesh for "DxT" over `devices` (default: all of them; the first D*T
    when there are more, with a note).

    The axes are `Auto`: XLA propagates shardings from the weights and the few constraints the
    model sets, so the model code needs no per-operation sharding annotations.
    """
    data, model = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    needed, multi = data * model, jax.process_count() > 1
    if needed > len(devices) or (needed < len(devices) and multi):
        raise ShardingError(
            f"mesh {spec} needs {needed} devices and {len(devices)} "
            f"{devices[0].platform} devices are there"
            + ("; a multi-process mesh takes every process's devices" if multi else
               f"; pick D and T with D*T <= {len(devices)}"))
    if needed < len(devices):
        note(f"mesh {spec} uses the first {needed} of the {len(devices)} "
             f"{devices[0].platform} devices")
        devices = devices[:needed]
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (None: replicated). The one table both decoders use.

    `kv_heads` falls back to replicated when the model axis does not divide the kv heads;
    every other sharded axis must divide evenly.
    """

    batch: str | None = DATA
    sequence: str | None = None
    vocab: str | None = MODEL
    embed: str | None = None
    heads: str | None = MODEL
    kv_heads: str | None = MODEL
    head_dim: str | None = None
    mlp: str | None = MODEL
    layers: str | None = None

    def spec(self, axes: Sequence[str | None]) -> P:
        mesh_axes = [None if a is None else getattr(self, a) for a in axes]
        used = [m for m in mesh_axes if m is not None]
        if len(used) != len(set(used)):
            raise ShardingError(f"logical axes {tuple(axes)} map to {tuple(mesh_axes)}: "
                                "one mesh axis may shard only one dimension")
        return P(*mesh_axes)


RULES = ShardingRules()
SEQUENCE_PARALLEL_RULES = ShardingRules(sequence=MODEL)


def rules_for(sequence_parallel: bool) -> ShardingRules:
    """The activations' layout: sequence parallel (see `registry.shard`) or Megatron's."""
    return SEQUENCE_PARALLEL_RULES if sequence_parallel else RULES


def model_axis_size(mesh=None) -> int:
    """The size of `model` on `mesh` (default: the mesh set with `jax.set_mesh`), 1 if none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return dict(mesh.shape).get(MODEL, 1)


def kv_heads_on(kv_heads: int, tp: int) -> int:
    """The kv heads a model computes with on a `tp`-way model axis: with fewer kv heads than
    devices each device repeats the one its query heads use (Megatron), so there are `tp`."""
    return max(kv_heads, tp)


def check_layout(config, tp: int) -> None:
    """Raise if `config` cannot be split `tp` ways the Megatron way."""
    n, kv, f = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
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
    spec = list(rules.spec(axes))
    for i, (axis, mesh_axis) in enumerate(zip(axes, spec, strict=True)):
        size = mesh.shape[mesh_axis] if mesh_axis else 1
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
    spec = [m if m and x.shape[i] % mesh.shape[m] == 0 else None
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
