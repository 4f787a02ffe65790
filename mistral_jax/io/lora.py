"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): each targeted
weight W is used as W + (alpha / r) A B with A [in, r] random and B [r, out] zero, and only A and
B are trained. Training keeps them beside the weights (`attach`; the layer computes
x W + (alpha / r) (x A) B, see `nn/adapters`), so the frozen base may be int8 (QLoRA, Dettmers et
al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", with int8 for NF4); `merge` writes
the sum into float weights for good, as loading adapters onto a float base does.

A and B take their sharding from W's logical axes: for a column-parallel W (q, gate) B is split
like W's output and A is replicated; for a row-parallel W (o, down) A is split like W's input.

An adapters directory (what `train.finetune --lora-rank` writes as OUT/adapters) holds
`adapter_config.json` (rank, alpha, targets, the base model's config) and the A and B arrays
under `weights/`; `mistral_jax.load(base, adapters=DIR)` applies it to a base model, and
`python -m convert.to_torch DIR OUT` exports it in PEFT's format.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, SingleDeviceSharding

from mistral_jax.arch import weights
from mistral_jax.arch.configs import Config, model_type, to_hf_dict
from mistral_jax.base import trees
from mistral_jax.io import files
from mistral_jax.nn import adapters as nn_adapters
from mistral_jax.nn.adapters import ATTRIBUTE
from mistral_jax.parallel import sharding
from mistral_jax.quant import int8 as quant

CONFIG_FILE = "adapter_config.json"
FORMAT = "mistral_jax-lora"


class LoraError(ValueError):
    pass


def check_targets(targets: list[str], kind: str) -> None:
    known = tuple(weights.lora_targets(kind))
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        raise LoraError(f"--lora-targets {','.join(targets)}: {kind} weights that LoRA can "
                        f"target are {','.join(known)}")


def _inputs(name: str) -> int:
    """The input axes of target `name` (o [heads, head_dim, embed]: two; the others: one)."""
    return next(w.inputs for kind in weights.TABLES
                for short, w in weights.lora_targets(kind).items() if short == name)


def _split(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input dims, output dims) of a stacked weight [layers, *in, *out]."""
    n_in = _inputs(name)
    return shape[1:1 + n_in], shape[1 + n_in:]


def shapes(name: str, weight_shape: tuple[int, ...], rank: int) -> tuple[tuple, tuple]:
    """The shapes of A [L, *in, r] and B [L, r, *out] for a stacked weight [L, *in, *out]."""
    ins, outs = _split(name, weight_shape)
    return (weight_shape[0], *ins, rank), (weight_shape[0], rank, *outs)


def _shardings(name: str, names: tuple, a_shape: tuple, b_shape: tuple, mesh):
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return device, device
    n_in = _inputs(name)
    a_axes, b_axes = (*names[:1 + n_in], None), (names[0], None, *names[1 + n_in:])
    rules = sharding.WEIGHTS  # as the weights they adapt: over fsdp on embed too
    return (NamedSharding(mesh, sharding.spec_for(a_axes, a_shape, mesh, rules)),
            NamedSharding(mesh, sharding.spec_for(b_axes, b_shape, mesh, rules)))


def _base(tree: dict, name: str):
    """Stacked weight `name` (its array or axes) in a weights tree; an int8 weight's values."""
    w = tree["layers"][name]
    return w["values"] if isinstance(w, dict) else w


def init(weights: dict, axes: dict, targets: list[str], rank: int, seed: int, mesh=None) -> dict:
    """{"layers": {name: {"a": [L, *in, r], "b": [L, r, *out]}}} for each target, float32
    (over float or int8 weights alike): A random, B zeros, in their shards on `mesh`."""
    keys = iter(jax.random.split(jax.random.key(seed), len(targets)))
    adapters = {}
    for name, at in abstract(weights, axes, targets, rank, mesh)["layers"].items():
        a_shape, b_shape = at["a"].shape, at["b"].shape
        values = {"a": jax.random.normal(next(keys), a_shape, jnp.float32)
                  / math.sqrt(math.prod(a_shape[1:-1])), "b": jnp.zeros(b_shape, jnp.float32)}
        if mesh is not None:
            values = {k: jax.device_put(v, at[k].sharding) for k, v in values.items()}
        adapters[name] = values
    return {"layers": adapters}


def abstract(weights: dict, axes: dict, targets: list[str], rank: int, mesh=None) -> dict:
    """The adapters `init` makes, as shapes with their shardings on `mesh` (nothing
    allocated): what train.plan compiles a LoRA step with."""
    adapters = {}
    for name in targets:
        a_shape, b_shape = shapes(name, _base(weights, name).shape, rank)
        a_at, b_at = _shardings(name, _base(axes, name), a_shape, b_shape, mesh)
        adapters[name] = {"a": jax.ShapeDtypeStruct(a_shape, jnp.float32, sharding=a_at),
                          "b": jax.ShapeDtypeStruct(b_shape, jnp.float32, sharding=b_at)}
    return {"layers": adapters}


def delta(name: str, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A B for a stacked weight: [L, *in, r] x [L, r, *out] -> [L, *in, *out]."""
    n_in = a.ndim - 2
    letters = "ijklmn"
    ins, outs = letters[:n_in], letters[n_in: n_in + b.ndim - 2]
    return scale * jnp.einsum(f"z{ins}r,zr{outs}->z{ins}{outs}", a, b)


def beside(adapters: dict, base: dict) -> dict:
    """The tree `trees.with_weights` fills a model from, for a model that carries `adapters`
    unmerged (`attach`): the base weights and the adapters under layers.lora."""
    return {**base, "layers": {**base["layers"], ATTRIBUTE: adapters["layers"]}}


def attach(model, adapters: dict, scale: float):
    """`model` carrying `adapters` ({"layers": {name: {"a", "b"}}}, arrays or shapes) beside
    its weights, unmerged (`nn.adapters`): how LoRA trains, and how adapters run on an int8
    base."""
    return nn_adapters.attach(model, adapters["layers"], scale)


def merge(base: dict, adapters: dict, scale: float) -> dict:
    """The weights with each adapter's product added, in float32 then cast back to the
    weight's dtype (a new dict; `base` is untouched)."""
    layers = dict(base["layers"])
    for name, ab in adapters["layers"].items():
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + delta(name, ab["a"], ab["b"], scale)).astype(
            w.dtype)
    return {**base, "layers": layers}


# --- adapters directories ----------------------------------------------------------------------


def write(adapters: dict, path: str | os.PathLike, *, rank: int, alpha: float,
          targets: list[str], config: Config, base: str | None,
          base_quantize: str | None = None) -> Path:
    """The adapters directory `path` (replaced whole if it exists; every process takes part).
    `base_quantize`: "int8" when they were trained over `base` quantized (QLoRA)."""
    info = {"format": FORMAT, "model_type": model_type(config), "rank": rank, "alpha": alpha,
            "targets": list(targets), "base": base, "base_config": to_hf_dict(config),
            "base_quantize": base_quantize}
    with files.atomic_directory(path, overwrite=True) as tmp:
        files.write_json(tmp / CONFIG_FILE, info)
        files.write_arrays(tmp / files.WEIGHTS, adapters)
    return Path(path).absolute()


def is_adapters(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / files.WEIGHTS).is_dir()


def read_info(path: str | os.PathLike) -> dict:
    """adapter_config.json of the adapters directory `path`, checked."""
    path = Path(path)
    if not path.exists():
        raise LoraError(f"{path} does not exist (an adapters directory was expected)")
    if not is_adapters(path):
        peft = (path / "adapter_model.safetensors").is_file()
        what = "a PEFT adapter folder, not" if peft else "not"
        raise LoraError(f"{path} is {what} an adapters directory as train.finetune --lora-rank "
                        f"writes them ({CONFIG_FILE} and {files.WEIGHTS}/)")
    try:
        info = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as e:
        raise LoraError(f"{path / CONFIG_FILE}: not JSON ({e})") from None
    missing = [k for k in ("rank", "alpha", "targets") if k not in info] \
        if isinstance(info, dict) else ["a JSON object"]
    if missing:
        raise LoraError(f"{path / CONFIG_FILE}: not an adapters config (no {', '.join(missing)})")
    return info


def apply(model, path: str | os.PathLike):
    """`model` with the adapters in `path` merged into its float weights, or beside its int8
    ones (unmerged: see `nn.adapters`), on the model's mesh if any. The adapters must have been
    trained on a model of the same shape."""
    path = Path(path).absolute()
    info = read_info(path)
    kind = model_type(model.config)
    if info.get("model_type", kind) != kind:
        raise LoraError(f"{path}: adapters for a {info['model_type']} model, and this model "
                        f"is a {kind}")
    check_targets(info["targets"], kind)
    weights, axes = trees.weights(model), trees.logical_axes(model)
    stored = files.stored_shapes(path / files.WEIGHTS)
    mesh = sharding.mesh_of(model)
    target, problems = {}, []
    for name in info["targets"]:
        a_shape, b_shape = shapes(name, _base(weights, name).shape, info["rank"])
        got = stored.get("layers", {}).get(name, {})
        for part, want in (("a", a_shape), ("b", b_shape)):
            if part not in got:
                problems.append(f"layers.{name}.{part} is missing")
            elif tuple(got[part].shape) != want:
                problems.append(f"layers.{name}.{part}: shape {tuple(got[part].shape)}, this "
                                f"model needs {want}")
        a_at, b_at = _shardings(name, _base(axes, name), a_shape, b_shape, mesh)
        target[name] = {"a": jax.ShapeDtypeStruct(a_shape, jnp.float32, sharding=a_at),
                        "b": jax.ShapeDtypeStruct(b_shape, jnp.float32, sharding=b_at)}
    if problems:
        raise LoraError(f"{path}: the adapters do not fit this model (trained on "
                        f"{info.get('base') or 'another model'}): " + "; ".join(problems))
    adapters = files.read_arrays(path / files.WEIGHTS, {"layers": target})
    scale = info["alpha"] / info["rank"]
    if quant.is_quantized(model):
        return attach(model, adapters, scale)
    merged = jax.jit(lambda w, ad: merge(w, ad, scale), donate_argnums=0,
                     out_shardings=jax.tree.map(lambda x: x.sharding, weights))(weights, adapters)
    return trees.with_weights(model, merged)
