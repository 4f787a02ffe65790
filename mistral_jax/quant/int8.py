"""Int8 weight-only quantization: symmetric, per output channel (or per group of the input, as
GGUF's Q8_0 blocks of 32), the scales kept beside the weights.

A quantized weight is one `Int8` node of the model: int8 `values` of the float weight's shape and
logical axes, and float32 `scale`s whose input axes are replaced by one axis of G groups (G = 1:
one scale per output channel). So the scales of a column-parallel weight carry its output axes
and shard with its columns, by the same rules. A checkpoint holds both as plain arrays, `name`
and `name_scale` (`stored` and `in_memory` turn one naming into the other).

    w ~= values * scale    (each group of K/G inputs of an output channel shares a scale)

Weights used as `x @ w` are "kn" ([*in, *out], scale [G, *out]); the tied embedding table
[vocab, d] is "nk" (its rows are the output channels of the LM head; scale [vocab, G]), so an
embedding lookup takes each row's scales with it. Norms, biases and learned positions stay float.
A decode step's matmuls dequantize inside our kernel on a CPU (`mistral_jax.kernels`), and in
XLA's convert fused into the dot on a GPU: no float copy of a weight. Elsewhere (XLA:CPU for
prefill chunks of more than KERNEL_MAX_ROWS rows, forward passes, sharded models) XLA converts
each layer's weight to float before its dot, a copy the many rows share.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_jax import kernels
from mistral_jax.arch import weights
from mistral_jax.arch.configs import model_type
from mistral_jax.base import trees
from mistral_jax.parallel.placement import place
from mistral_jax.parallel.sharding import mesh_of

SCALE = "_scale"
# Above this many rows (tokens x batch) a matmul leaves the CPU kernel for XLA's: the kernel
# is built for decoding, where reading the weights is the whole cost
KERNEL_MAX_ROWS = 64
METHODS = ("int8",)


class QuantError(ValueError):
    pass


class QWeight(NamedTuple):
    """An int8 weight and its scales, as a matmul takes them."""

    values: jax.Array
    scale: jax.Array


class Int8(nnx.Module):
    """A quantized weight in a model: its int8 values and their scales, one node of the tree
    (`layers.q` holds `layers.q.values` and `layers.q.scale`), each a Param with its axes."""

    def __init__(self, values, scale, axes: tuple, scale_axes: tuple):
        self.values = nnx.Param(values, axes=axes)
        self.scale = nnx.Param(scale, axes=scale_axes)

    def weight(self) -> QWeight:
        return QWeight(self.values[...], self.scale[...])


def arrays(w) -> tuple[jax.Array, jax.Array | None]:
    """A weight's arrays: (int8 values, scales) of an `Int8`, (the array, None) of a Param."""
    return (w.values[...], w.scale[...]) if isinstance(w, Int8) else (w[...], None)


class Stacked(NamedTuple):
    """Layer `index` of a stacked weight (bfloat16, or int8 with `scale`), left unsliced so
    that the CPU kernel reads it in place (slicing a stacked array in XLA copies the slice)."""

    values: jax.Array
    scale: jax.Array | None
    index: jax.Array


def check_method(method: str | None) -> None:
    if method is not None and method not in METHODS:
        raise QuantError(f"quantize={method!r}: the methods are {', '.join(METHODS)}")


def table(model_or_config) -> dict:
    """The weights that are quantized: {dotted name: (layout, number of input axes)}, from
    `arch/weights.py`. In a stacked weight [layers, *in, *out] the layers axis is not counted."""
    config = getattr(model_or_config, "config", model_or_config)
    return {name: (w.layout, w.inputs)
            for name, w in weights.matmuls(model_type(config)).items()}


# --- arrays ------------------------------------------------------------------------------------


def grouped_shape(shape, lead: int, n_in: int, layout: str, groups: int):
    """The shape with the input axes split into [G, K/G] (kn) or [..., G, K/G] (nk)."""
    if layout == "kn":
        ins, outs = shape[lead:lead + n_in], shape[lead + n_in:]
        k = math.prod(ins)
        return (*shape[:lead], groups, k // groups, *outs), lead + 1
    k = math.prod(shape[len(shape) - n_in:])
    return (*shape[:len(shape) - n_in], groups, k // groups), len(shape) - n_in + 1


def input_size(shape, lead: int, n_in: int, layout: str) -> int:
    return math.prod(shape[lead:lead + n_in] if layout == "kn" else shape[len(shape) - n_in:])


def scale_shape(shape, lead: int, n_in: int, layout: str, groups: int) -> tuple:
    grouped, axis = grouped_shape(shape, lead, n_in, layout, groups)
    return grouped[:axis] + grouped[axis + 1:]


def scale_axes(axes: tuple, lead: int, n_in: int, layout: str) -> tuple:
    """A scale's logical axes: the weight's, its input axes replaced by one unsharded group axis
    (a row-parallel weight's scales are small and replicated)."""
    if layout == "kn":
        return (*axes[:lead], None, *axes[lead + n_in:])
    return (*axes[:len(axes) - n_in], None)


def quantize(w, lead: int, n_in: int, layout: str, group: int | None = None):
    """(int8 values, float32 scales) of a float weight (numpy or jax): max |w| of each output
    channel's group of `group` inputs (default: all of them) maps to 127."""
    xp = np if isinstance(w, np.ndarray) else jnp
    k = input_size(w.shape, lead, n_in, layout)
    groups = 1 if group is None else k // group
    if group is not None and k % group:
        raise QuantError(f"group size {group} does not divide the input size {k}")
    grouped, axis = grouped_shape(w.shape, lead, n_in, layout, groups)
    g = xp.asarray(w, xp.float32).reshape(grouped)
    amax = xp.max(xp.abs(g), axis=axis, keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    values = xp.clip(xp.round(g / scale), -127, 127).astype(xp.int8).reshape(w.shape)
    return values, xp.squeeze(scale, axis)


def dequantize(values, scale, lead: int, n_in: int, layout: str, dtype=jnp.float32):
    """The float weight `values * scale` (checks, exports and the tests; matmuls never do this
    to a whole weight)."""
    xp = np if isinstance(values, np.ndarray) else jnp
    groups = scale.shape[lead] if layout == "kn" else scale.shape[-1]
    grouped, axis = grouped_shape(values.shape, lead, n_in, layout, groups)
    w = values.reshape(grouped).astype(xp.float32) * xp.expand_dims(scale, axis)
    return w.reshape(values.shape).astype(dtype)


def rows(values, scale, ids, dtype):
    """Rows `ids` of an "nk" table (the embedding), dequantized: [*ids.shape, d]."""
    got, s = jnp.take(values, ids, axis=0), jnp.take(scale, ids, axis=0)
    return dequantize(got, s, got.ndim - 1, 1, "nk", dtype)


def project(equation: str, x: jax.Array, w, *, kernel: bool) -> jax.Array:
    """`einsum(equation, x, w)` for a QWeight, a Stacked layer, or a bfloat16 weight, in the
    CPU kernel when `kernel` (and it is built), else in XLA; float32, or x's dtype if float.

    The contracted axes are x's last ones and w's first ("kn") or last ("nk")."""
    xs, rest = equation.split(",")
    ws, out = rest.split("->")
    n_in = sum(c in xs for c in ws)
    layout = "kn" if all(c in xs for c in ws[:n_in]) else "nk"
    index = w.index if isinstance(w, Stacked) else None
    values, scale = (w.values, w.scale) if isinstance(w, QWeight | Stacked) else (w, None)
    lead = 0 if index is None else 1
    inner = values.shape[lead:]
    k = math.prod(inner[:n_in] if layout == "kn" else inner[len(inner) - n_in:])
    outs = inner[n_in:] if layout == "kn" else inner[:len(inner) - n_in]
    n = math.prod(outs)
    shaped = (*values.shape[:lead], *((k, n) if layout == "kn" else (n, k)))
    scale_shaped = None
    if scale is not None:
        g = scale.shape[lead] if layout == "kn" else scale.shape[-1]
        scale_shaped = (*scale.shape[:lead], *((g, n) if layout == "kn" else (n, g)))
    x2 = x.reshape(-1, k)
    in_kernel = kernel and x2.shape[0] <= KERNEL_MAX_ROWS
    if scale is not None and index is None and not in_kernel:  # (training's: differentiable)
        y = _dequantizing(x2.astype(jnp.float32), values, scale, layout, shaped, scale_shaped)
    else:
        y = (kernels.matmul if in_kernel else kernels.reference)(
            x2, values.reshape(shaped), None if scale is None else scale.reshape(scale_shaped),
            index=index, layout=layout)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return y.reshape(*x.shape[:x.ndim - n_in], *outs).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dequantizing(x, values, scale, layout: str, shaped: tuple, scale_shaped: tuple):
    """XLA's matmul of x [M, K] and an int8 weight (values and scale as the model holds them,
    made [K, N] and [G, N] (kn) or [N, K] and [N, G] (nk) here), differentiable in x only: the
    weight is frozen (only LoRA trains over an int8 base).

    At least as many rows as inputs (a training micro-batch), the scales multiply the weight
    as it is converted (the float copy of one layer's weight that XLA:CPU makes for the dot
    anyway) rather than the [M, N] output: in the default model's QLoRA step 29 MB less
    temporary memory, the LM head's logits not held twice. Fewer rows (decoding off the CPU
    kernel): `kernels.reference`, the convert fused into the dot on a GPU, scales after.

    XLA's own backward pass would keep that float weight as a residual, under the layer scan a
    float copy of every layer's weight held from the forward pass to the backward (11 MB more
    there: the layers' whole float base); here the backward converts again, one layer at a
    time. The residuals are the weight's arrays as they came in, which the scan reads back from
    the stacked weights (reshaped ones, it saved a copy of: another int8 base). The CPU kernel
    serves decoding only: at a micro-batch's 2048 rows XLA's dot is faster (bench/qlora.py)."""
    w, s = values.reshape(shaped), scale.reshape(scale_shaped)
    if x.shape[0] < x.shape[1]:
        return kernels.reference(x, w, s, layout=layout)
    w = dequantize(w, s, 0, 1, layout)
    return x @ w if layout == "kn" else x @ w.T


def _dequantizing_fwd(x, values, scale, layout, shaped, scale_shaped):
    return _dequantizing(x, values, scale, layout, shaped, scale_shaped), (values, scale)


def _dequantizing_bwd(layout, shaped, scale_shaped, residuals, g):
    """dx = g (values * scale)^T for g [M, N]: the scales on the weight or on g, as forward."""
    values, scale = residuals
    w, s = values.reshape(shaped), scale.reshape(scale_shaped)
    k = shaped[0] if layout == "kn" else shaped[1]
    if g.shape[0] >= k:
        w = dequantize(w, s, 0, 1, layout)
        dx = g @ w.T if layout == "kn" else g @ w
    elif layout == "kn":  # each group of K/G inputs of an output channel shares a scale
        groups = s.shape[0]
        dx = jnp.einsum("mgn,gkn->mgk", g[:, None, :] * s,
                        w.astype(jnp.float32).reshape(groups, -1, w.shape[1]))
    else:
        groups = s.shape[1]
        dx = jnp.einsum("mgn,ngk->mgk", g[:, None, :] * s.T,
                        w.astype(jnp.float32).reshape(w.shape[0], groups, -1))
    return (dx.reshape(g.shape[0], -1), np.zeros(values.shape, jax.dtypes.float0),
            jnp.zeros_like(scale))


_dequantizing.defvjp(_dequantizing_fwd, _dequantizing_bwd)


# --- models ------------------------------------------------------------------------------------


def _split(name: str):
    return ("layers", name.split(".", 1)[1]) if name.startswith("layers.") else (None, name)


def lead(name: str) -> int:
    """Leading axes that are not the matmul's: 1 (layers) for a stacked weight."""
    return 1 if name.startswith("layers.") else 0


def is_quantized(model) -> bool:
    return isinstance(model.embed, Int8)


def stored(flat: dict) -> dict:
    """A flat tree (arrays, shapes or shardings) named as in memory, named as a checkpoint
    stores it: `name.values` -> `name`, `name.scale` -> `name_scale`."""
    out = {}
    for k, v in flat.items():
        base, _, leaf = k.rpartition(".")
        out[base if leaf == "values" else base + SCALE if leaf == "scale" else k] = v
    return out


def in_memory(flat: dict, names) -> dict:
    """`stored` undone for the quantized weights `names`."""
    out = dict(flat)
    for name in names:
        out[name + ".values"], out[name + ".scale"] = out.pop(name), out.pop(name + SCALE)
    return out


def group_counts(tree: dict, kind_table: dict) -> dict:
    """{weight name: G} from a flat tree of weights (arrays or shapes) that holds scales."""
    counts = {}
    for name, (layout, _) in kind_table.items():
        s = tree.get(name + SCALE)
        if s is not None:
            counts[name] = s.shape[lead(name)] if layout == "kn" else s.shape[-1]
    return counts


def restructure(model, groups: dict):
    """`model` (abstract or not) with each weight in `groups` turned into an `Int8` of G scale
    groups (its values: zeros if the model is concrete)."""
    kinds = table(model)
    for name, g in groups.items():
        layout, n_in = kinds[name]
        owner, attr = _split(name)
        module = getattr(model, owner) if owner else model
        p = getattr(module, attr, None)
        if p is None:  # (an lm_head that a tied model has not)
            continue
        ld, axes = lead(name), p.get_metadata()["axes"]
        value = p.get_value()
        shape = tuple(value.shape)
        k = input_size(shape, ld, n_in, layout)
        if k % g:
            raise QuantError(f"{name}: {g} scale groups do not divide its input size {k}")
        s_shape = scale_shape(shape, ld, n_in, layout, g)
        abstract = isinstance(value, jax.ShapeDtypeStruct)
        make = (lambda sh, dt: jax.ShapeDtypeStruct(sh, dt)) if abstract else jnp.zeros
        setattr(module, attr, Int8(make(shape, jnp.int8), make(s_shape, jnp.float32), axes,
                                   scale_axes(axes, ld, n_in, layout)))
    return model


def quantize_weights(flat: dict, kinds: dict, group: int | None = None) -> dict:
    """A flat tree of float weights with each matmul weight quantized (jax or numpy), named as
    in memory (`name.values`, `name.scale`)."""
    out = dict(flat)
    for name, (layout, n_in) in kinds.items():
        if name in flat:
            out[name + ".values"], out[name + ".scale"] = quantize(out.pop(name), lead(name),
                                                                   n_in, layout, group)
    return out


def quantized(model, group: int | None = None):
    """A float model's int8 copy (on the model's devices and shardings, when on a mesh)."""
    if is_quantized(model):
        return model
    kinds = {k: v for k, v in table(model).items()
             if k in trees.flatten(trees.weights(model))}
    flat = trees.flatten(trees.weights(model))
    groups = {name: 1 if group is None else
              input_size(flat[name].shape, lead(name), kinds[name][1], kinds[name][0]) // group
              for name in kinds}
    target = restructure(nnx.eval_shape(lambda: model), groups)
    mesh = mesh_of(model)
    shardings = None if mesh is None else place(target, mesh).shardings
    make = jax.jit(lambda f: trees.unflatten(quantize_weights(f, kinds, group)),
                   out_shardings=shardings)
    return trees.with_weights(target, make(flat))


def dequantized(model, dtype=jnp.float32):
    """A quantized model's float copy (for exports)."""
    if not is_quantized(model):
        return model
    out = trees.flatten(trees.weights(model))
    for name, (layout, n_in) in table(model).items():
        if name + ".values" in out:
            out[name] = dequantize(out.pop(name + ".values"), out.pop(name + ".scale"),
                                   lead(name), n_in, layout, dtype)
    target = nnx.eval_shape(lambda: type(model)(model.config, tokenizer=model.tokenizer,
                                                vocab_padded=model.vocab_padded, dtype=dtype,
                                                options=model.options))
    return trees.with_weights(target, trees.unflatten(out))


def kernel_ok(model) -> bool:
    """Whether the decode step's matmuls go to the CPU kernel: every matmul weight int8,
    bfloat16 or float32, the kernel built, and no mesh to split them over (a sharded matmul
    stays XLA's)."""
    dtypes = set()
    for name in table(model):
        owner, attr = _split(name)
        param = getattr(model.layers if owner else model, attr, None)
        if param is not None:  # (a tied model has no lm_head)
            dtypes.add((param.values if isinstance(param, Int8) else param)[...].dtype)
    if not dtypes <= set(map(jnp.dtype, kernels.WEIGHT_DTYPES)) or not kernels.available():
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def scale_problems(weights: dict, scales: dict, kinds: dict) -> list[str]:
    """What is wrong with the scales of a flat tree of weights (shapes or arrays): an int8
    weight without scales, scales of a float weight, or scales of the wrong shape."""
    problems = []
    for name, (layout, n_in) in kinds.items():
        w, s = weights.get(name), scales.get(name + SCALE)
        if w is None:
            if s is not None:
                problems.append(f"unexpected {name + SCALE} {tuple(s.shape)}")
            continue
        if (s is None) != (w.dtype != np.int8):
            problems.append(f"{name}: {w.dtype} weights " + (
                "without their scales" if s is None else f"with scales {name + SCALE}"))
            continue
        if s is None:
            continue
        ld = lead(name)
        g = s.shape[ld] if layout == "kn" and len(s.shape) > ld else s.shape[-1]
        k = input_size(w.shape, ld, n_in, layout)
        want = scale_shape(w.shape, ld, n_in, layout, g) if k % g == 0 else None
        if tuple(s.shape) != want:
            problems.append(f"{name + SCALE}: shape {tuple(s.shape)} does not fit {name} "
                            f"{tuple(w.shape)}")
    return problems
