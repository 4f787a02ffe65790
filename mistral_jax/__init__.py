"""mistral_jax: Megatron GPT-2 and Mistral decoders in JAX / Flax NNX.

    params = mistral_jax.load("ckpt/")
    logits = mistral_jax.forward(params, input_ids, attention_mask)   # [b, t, vocab] float32
"""

from __future__ import annotations

import contextlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.checkpoint import CheckpointError, load, save
from mistral_jax.configs import ConfigError, GPT2Config, MistralConfig, preset
from mistral_jax.decoder import Decoder, Output
from mistral_jax.generate import generate, generate_tokens
from mistral_jax.models import init
from mistral_jax.sharding import ShardingError, make_mesh, mesh_of, shard

__all__ = ["CheckpointError", "ConfigError", "Decoder", "GPT2Config", "MistralConfig", "Output",
           "ShardingError", "forward", "generate", "generate_tokens", "init", "load", "loss",
           "make_mesh", "preset", "save", "shard"]


def forward(params: Decoder, input_ids=None, attention_mask=None, positions=None, *,
            inputs_embeds=None, output_hidden_states: bool = False,
            output_attentions: bool = False):
    """Logits [b, t, vocab_size] float32 (an `Output` when per-layer outputs are asked for).

    Without `positions`, positions are cumsum(attention_mask) - 1, so a left-padded row gives
    the logits of the same row unpadded.
    """
    if input_ids is not None:
        input_ids = _check_ids(input_ids, params.config.vocab_size)
    with _on_mesh_of(params):
        return _forward(params, input_ids, attention_mask, positions, inputs_embeds,
                        output_hidden_states, output_attentions)


@partial(jax.jit, static_argnums=(5, 6))
def _forward(params, input_ids, attention_mask, positions, inputs_embeds, hidden, attentions):
    return params(input_ids, attention_mask, positions, inputs_embeds=inputs_embeds,
                  output_hidden_states=hidden, output_attentions=attentions)


def loss(params: Decoder, input_ids, attention_mask=None, labels=None, positions=None):
    """Mean next-token cross-entropy (transformers' causal-LM loss; label -100 is ignored).

    Without `labels`, the inputs are the labels and padding is ignored.
    """
    input_ids = _check_ids(input_ids, params.config.vocab_size)
    with _on_mesh_of(params):
        return _loss(params, input_ids, attention_mask, labels, positions)


@jax.jit
def _loss(params, input_ids, attention_mask, labels, positions):
    return params.loss(input_ids, attention_mask, labels, positions)


def _check_ids(input_ids, vocab_size: int):
    """Token ids outside [0, vocab_size) would silently read garbage rows: refuse them."""
    input_ids = jnp.asarray(input_ids) if not isinstance(input_ids, jax.core.Tracer) else input_ids
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        lo, hi = int(np.min(input_ids)), int(np.max(input_ids))
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
                             "check the tokenizer matches this checkpoint")
    return input_ids


def _on_mesh_of(params):
    """Trace under the mesh the weights live on, so the model's sharding constraints apply."""
    mesh = mesh_of(params)
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
