"""What both decoders share: parameter creation, norms, RoPE, masks, attention, MLP activations,
and the causal-LM loss.

Numerics follow Hugging Face transformers' torch models (the parity reference): norms, softmax and
the loss run in float32 whatever the compute dtype; RoPE uses the rotate-halves layout.
Shape letters: b batch, t query time, s key time, d embed, n query heads, k kv heads,
g query heads per kv head, h head_dim, f mlp, v vocab, l layers.
"""

from __future__ import annotations

import math
from functools import partial

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


def project(equation: str, x: jax.Array, w) -> jax.Array:
    """`jnp.einsum(equation, x, w)` for a weight projection ("btd,dnh->btnh"). `w` is an array,
    an int8 `quant.QWeight` (dequantized inside the matmul), or a `quant.Stacked` layer of a
    stacked weight (the decode step's matmuls in the CPU kernel, see `Decoder.step`)."""
    if isinstance(w, quant.QWeight | quant.Stacked):
        return quant.project(equation, x, w, kernel=isinstance(w, quant.Stacked))
    return _einsum(equation, x, w)


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


def attention_mask_bts(attention_mask: jax.Array, sliding_window: int | None,
                       segment_ids: jax.Array | None = None) -> jax.Array:
    """Boolean [b, t, s] mask: causal, within the window (0 <= i - j < window, as HF), not padding,
    and, with `segment_ids` [b, t], within the query's own segment (packed documents).

    Query and key indices are positions in the (padded) sequence, as in transformers.
    """
    t = attention_mask.shape[-1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= i - j < sliding_window
    allowed = allowed[None] & attention_mask[:, None, :].astype(bool)
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return allowed


# --- attention ---------------------------------------------------------------------------------


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """[b, t, n, h] -> [b, k, g * t, h], scaled by 1/sqrt(h): each kv head's queries in one block,
    so the score matmul writes [b, k, g * t, s] with keys minor, the layout softmax and the
    value matmul read (left to pick, XLA's CPU backend wrote the scores query-head minor and then
    transposed the whole score tensor)."""
    b, t, n, h = q.shape
    q = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
    return (q * (1.0 / math.sqrt(h))).reshape(b, kv_heads, -1, h)


def ungroup(out: jax.Array, t: int) -> jax.Array:
    """The inverse of `group_queries`' layout: [b, k, g * t, h] -> [b, t, n, h]."""
    b, k, _, h = out.shape
    return out.reshape(b, k, -1, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, h)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis of float32 scores [b, k, g * t, s] where mask [b, t, s] allows.
    A row with nothing allowed gets a uniform average, never NaN."""
    b, k, _, s = scores.shape
    scores = scores.reshape(b, k, -1, *mask.shape[1:])
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).reshape(b, k, -1, s)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              return_weights: bool = False):
    """Grouped-query attention. q: [b, t, n, h], k/v: [b, s, k, h], mask: [b, t, s] bool.

    Each kv head serves n // k query heads (k == 1 is multi-query attention). Returns the output
    [b, t, n, h] and, when asked, the attention probabilities [b, n, t, s] (float32).
    A query whose keys are all masked (a padding position) gets a uniform average, never NaN.
    """
    b, t, n, h = q.shape
    k, v = (jnp.swapaxes(a, 1, 2) for a in (k, v))  # [b, k, s, h]
    scores = jnp.einsum("bkqh,bksh->bkqs", group_queries(q, k.shape[1]), k,
                        preferred_element_type=jnp.float32)
    probs = masked_softmax(scores, mask)
    out = ungroup(jnp.einsum("bkqs,bksh->bkqh", probs.astype(v.dtype), v), t)
    return out, (probs.reshape(b, n, t, -1) if return_weights else None)


QUERY_BLOCKS, MIN_QUERY_BLOCK = 8, 128  # causal attention: at most 8 blocks of at least 128


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attention` under a causal [b, t, t] mask (query i never sees key j > i, whatever else
    the mask says), in query blocks each scored only against the keys up to its own end:
    with n blocks, (n + 1) / 2n of the score work. A query that sees any key gets what
    `attention` gives it; a fully masked one (padding) averages the values of its block's keys."""
    t = q.shape[1]
    size = max(MIN_QUERY_BLOCK, -(-t // QUERY_BLOCKS))
    return jnp.concatenate([
        attention(q[:, lo:lo + size], k[:, :lo + size], v[:, :lo + size],
                  mask[:, lo:lo + size, :lo + size])[0]
        for lo in range(0, t, size)], axis=1)


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
