"""What both decoders share: parameter creation, projections, norms, RoPE, MLP activations and
the causal-LM loss (attention is in attention.py and the implementations beside it).

Numerics follow Hugging Face transformers' torch models (the parity reference): norms, softmax and
the loss run in float32 whatever the compute dtype; RoPE uses the rotate-halves layout.
Shape letters: b batch, t query time, s key time, d embed, n query heads, k kv heads,
g query heads per kv head, h head_dim, f mlp, v vocab, l layers.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.arch import configs
from mistral_jax.quant import int8 as quant

# --- parameters --------------------------------------------------------------------------------


class ParamMaker:
    """Makes `nnx.Param`s with their logical axes (`axes` metadata, read by the sharding rules)."""

    def __init__(self, rngs: nnx.Rngs, dtype, std: float):
        self.rngs, self.dtype, self.std = rngs, dtype, std

    def __call__(self, shape: tuple[int, ...], axes: tuple[str | None, ...],
                 init: str = "normal") -> nnx.Param:
        assert len(shape) == len(axes), (shape, axes)
        if init == "normal":
            value = self.std * jax.random.normal(self.rngs.params(), shape, self.dtype)
        else:
            value = (jnp.ones if init == "ones" else jnp.zeros)(shape, self.dtype)
        return nnx.Param(value, axes=axes)


# --- projections -------------------------------------------------------------------------------


class Adapted(NamedTuple):
    """A weight and its LoRA adapter, kept apart: `project` computes x W + scale (x A) B and
    never forms W + scale A B, so an int8 W stays int8 (QLoRA, Dettmers et al. 2023) and the
    backward pass gives A and B their rank-r gradients without W's full-size one.

    A [*in, r] and B [r, *out] are one layer's slices. With one more leading axis (A [b, *in, r],
    B [b, r, *out]) each row of the batch has its own adapter (several adapters in one batch)."""

    weight: object  # what `project` takes: an array, a quant.QWeight or a quant.Stacked
    a: jax.Array
    b: jax.Array
    scale: float


def project(equation: str, x: jax.Array, w) -> jax.Array:
    """`jnp.einsum(equation, x, w)` for a weight projection ("btd,dnh->btnh"). `w` is an array,
    an int8 `quant.QWeight` (dequantized inside the matmul), a `quant.Stacked` layer of a
    stacked weight (the decode step's matmuls in the CPU kernel, see `Decoder.step`), or any of
    these `Adapted` (LoRA beside it)."""
    if isinstance(w, Adapted):
        return project(equation, x, w.weight) + low_rank(equation, x, w)
    if isinstance(w, quant.QWeight | quant.Stacked):
        return quant.project(equation, x, w, kernel=isinstance(w, quant.Stacked))
    return _einsum(equation, x, w)


def low_rank(equation: str, x: jax.Array, w: Adapted) -> jax.Array:
    """scale (x A) B for the weight `equation` contracts x with ("btd,dnh->btnh": x A is
    "btd,dr->btr", then "btr,rnh->btnh"); the scale is applied to the rank-r product."""
    xs, rest = equation.split(",")
    ws, out = rest.split("->")
    n_in = sum(c in xs for c in ws)
    ins, outs = ws[:n_in], ws[n_in:]
    kept = "".join(c for c in xs if c not in ins)
    r = next(c for c in "rzyxw" if c not in equation)
    row = xs[0] if w.a.ndim > n_in + 1 else ""  # an adapter per row: its batch letter
    xa = _einsum(f"{xs},{row}{ins}{r}->{kept}{r}", x, w.a.astype(x.dtype))
    return _einsum(f"{kept}{r},{row}{r}{outs}->{out}", xa * w.scale, w.b.astype(x.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(equation, x, w)` whose backward pass keeps the incoming gradient whole before
    its two matmuls.

    Left to itself, XLA's CPU backend fuses the gradient's producer (the activation's backward)
    with the transpose the weight-gradient matmul wants, a strided loop several times slower
    than both matmuls; the barrier leaves the transpose to the matmul. Same numbers either way.
    """
    return jnp.einsum(equation, x, w)


def _project_fwd(equation, x, w):
    return jnp.einsum(equation, x, w), (x, w)


def _project_bwd(equation, residuals, g):
    x, w = residuals
    inputs, out = equation.split("->")
    x_axes, w_axes = inputs.split(",")
    g = jax.lax.optimization_barrier(g)
    dx = jnp.einsum(f"{out},{w_axes}->{x_axes}", g, w)
    dw = jnp.einsum(f"{x_axes},{out}->{w_axes}", x, g)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_einsum.defvjp(_project_fwd, _project_bwd)


# --- norms and activations ---------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _gelu_tanh(x):  # GPT-2's original approximation ("gelu_new", "gelu_pytorch_tanh")
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_fast(x):  # Megatron's bias_gelu_fusion form of the same approximation
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
}
assert tuple(ACTIVATIONS) == configs.ACTIVATIONS, "arch/configs.py names the activations"


# --- positions and masks -----------------------------------------------------------------------


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Absolute positions from a padding mask: a left-padded row counts from its first token."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """RoPE in Hugging Face's rotate-halves layout. x: [b, t, n, h], positions: [b, t]."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [h/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, h/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, t, 1, h]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


# --- loss --------------------------------------------------------------------------------------

IGNORE_INDEX = -100


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of counted tokens; label -100 is ignored.

    Written as logsumexp minus a one-hot contraction so that it runs on vocab-sharded logits
    without gathering them.
    """
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    one_hot = jax.nn.one_hot(jnp.where(valid, labels, 0), logits.shape[-1], dtype=logits.dtype)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * one_hot, axis=-1)
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)
