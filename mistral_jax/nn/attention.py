"""Attention at the lengths Mistral trains at: one switch over the implementations.

- "xla": scores materialized under a [b, t, t] mask (`dense.attention`, in causal query
  blocks). The only path that returns the attention weights (`output_attentions=True`).
- "blockwise": FlashAttention-2 in pure JAX (`blockwise.py`): memory O(t), work O(t x window),
  on every backend.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs (bfloat16 /
  float16), with `local_window_size` for the window; right padding only, no packed documents.
- "splash": Pallas splash attention on TPUs (`splash.py`), causal and local masks, packed
  documents as segment ids.
- "auto": the fused kernel where the backend has one and it supports the case, else
  blockwise, or xla for a sequence that fits in one query block (there blockwise computes the
  same scores, with its loops as pure overhead); xla when the weights are asked for.

Everything takes q [b, t, n, h] and k, v [b, t, kv, h] of one sequence attending to itself,
with a `Masking` (`masking.py`): which keys are real (padding), the packed documents, the
window. A query that sees no key at all (left padding) gets the plain average of all values in
every implementation, as in transformers' eager attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mistral_jax.nn import dense
from mistral_jax.nn.blockwise import BLOCKS, block_sizes, blockwise
from mistral_jax.nn.masking import Masking
from mistral_jax.parallel import sharding

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
HELP = ("attention implementation: blockwise (flash attention in JAX: memory O(t), work "
        "O(t x window)), xla (materialized scores), cudnn (NVIDIA GPUs), splash (TPUs), auto "
        "(the backend's fused kernel where it serves the case, else blockwise, or xla for a "
        "sequence that fits in one block)")  # --attention on every CLI


class AttentionError(ValueError):
    """An implementation asked for that cannot run here or cannot serve this case."""


def check(name: str) -> str:
    """`name`, if it is one of `IMPLEMENTATIONS`."""
    if name not in IMPLEMENTATIONS:
        raise AttentionError(f"attention={name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    return name


def choose(name: str, *, platform: str, dtype, masking: Masking, weights: bool = False,
           left_padded: bool | None = None, blocks=None) -> str:
    """The implementation that runs: `name` itself, or for "auto" the best that serves the case.
    An explicit choice that cannot serve it is an error that says why. `blocks`: blockwise's
    block sizes (see `blockwise`), None for the backend's."""
    check(name)
    if weights:
        if name not in ("auto", "xla"):
            raise AttentionError(f"attention={name!r} does not return the attention weights; "
                                 "output_attentions=True needs attention='xla' (or 'auto')")
        return "xla"
    if name in ("xla", "blockwise"):
        return name
    reasons = {"cudnn": _cudnn_cannot(platform, dtype, masking, left_padded),
               "splash": None if platform == "tpu" else f"needs a TPU; this is {platform}"}
    if name == "auto":
        fused = {"gpu": "cudnn", "tpu": "splash"}.get(platform)
        if fused and reasons[fused] is None:
            return fused
        # one query block holds the whole sequence: the same scores, without the loops (the
        # 256-token train step on a CPU: 1-7% faster in our runs, and it compiles faster)
        one_block = block_sizes(blocks, platform)[0][0]
        return "xla" if masking.valid.shape[1] <= one_block else "blockwise"
    if reasons[name]:
        raise AttentionError(f"attention={name!r} {reasons[name]}; attention='blockwise' "
                             "runs everywhere")
    return name


def _cudnn_cannot(platform: str, dtype, masking: Masking, left_padded: bool | None):
    if platform != "gpu":
        return f"needs an NVIDIA GPU; this is {platform}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"runs in bfloat16 or float16, and this model computes in {jnp.dtype(dtype)}"
    if masking.segments is not None:
        return "takes no packed documents (segment ids)"
    if left_padded is not False:
        return "takes right padding only (as sequence lengths), and this input may be left-padded"
    return None


def attend_with(name: str, masking: Masking, *, weights: bool = False, blocks=None,
                dtype=jnp.float32, left_padded: bool | None = None):
    """The `attend(q, k, v) -> (out, weights or None)` a decoder block takes."""
    platform = sharding.platform()  # the mesh's: train.plan traces a TPU step on a CPU
    chosen = choose(name, platform=platform, dtype=dtype, masking=masking, weights=weights,
                    left_padded=left_padded, blocks=blocks)
    if chosen == "xla":
        mask = masking.dense()
        if weights:
            return lambda q, k, v: dense.attention(q, k, v, mask, return_weights=True)
        return lambda q, k, v: (dense.causal_attention(q, k, v, mask), None)
    if chosen == "cudnn":
        return lambda q, k, v: (_cudnn(q, k, v, masking), None)
    if chosen == "splash":
        from mistral_jax.nn.splash import splash_attention

        block_q, block_k = blocks or BLOCKS["tpu"][0]
        return lambda q, k, v: (splash_attention(q, k, v, masking, block_q, block_k), None)
    return lambda q, k, v: (blockwise(q, k, v, masking, blocks), None)


def _cudnn(q, k, v, masking: Masking):
    lengths = jnp.sum(masking.valid, axis=1, dtype=jnp.int32)  # right padding: the real keys
    window = None if masking.window is None else (masking.window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                        local_window_size=window, implementation="cudnn")
