"""The model applied to token ids: `forward` (logits) and `loss`, with the checks every entry
point runs on its input before tracing: ids inside the vocabulary, and no more positions than
the model has (GPT-2's learned table would clamp silently; RoPE only warns, as transformers
does)."""

from __future__ import annotations

import contextlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.base.notes import warn_once
from mistral_jax.model.decoder import Decoder
from mistral_jax.parallel.sharding import mesh_of


def forward(model: Decoder, input_ids=None, attention_mask=None, positions=None, *,
            inputs_embeds=None, output_hidden_states: bool = False,
            output_attentions: bool = False):
    """Logits [b, t, vocab_size] float32 (an `Output` when per-layer outputs are asked for).

    Without `positions`, positions are cumsum(attention_mask) - 1, so a left-padded row gives
    the logits of the same row unpadded.
    """
    if input_ids is not None:
        input_ids = check_ids(input_ids, model.config.vocab_size)
    length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    check_positions(model.config, length, "input_ids" if input_ids is not None else
                    "inputs_embeds", positions)
    with on_mesh(mesh_of(model)):
        return _forward(model, input_ids, attention_mask, positions, inputs_embeds,
                        output_hidden_states, output_attentions)


@partial(jax.jit, static_argnums=(5, 6))
def _forward(model, input_ids, attention_mask, positions, inputs_embeds, hidden, attentions):
    return model(input_ids, attention_mask, positions, inputs_embeds=inputs_embeds,
                  output_hidden_states=hidden, output_attentions=attentions)


def loss(model: Decoder, input_ids, attention_mask=None, labels=None, positions=None):
    """Mean next-token cross-entropy (transformers' causal-LM loss; label -100 is ignored).

    Without `labels`, the inputs are the labels and padding is ignored.
    """
    input_ids = check_ids(input_ids, model.config.vocab_size)
    check_positions(model.config, input_ids.shape[1], "input_ids", positions)
    with on_mesh(mesh_of(model)):
        return _loss(model, input_ids, attention_mask, labels, positions)


@jax.jit
def _loss(model, input_ids, attention_mask, labels, positions):
    return model.loss(input_ids, attention_mask, labels, positions)


def check_ids(input_ids, vocab_size: int):
    """Token ids outside [0, vocab_size) would silently read garbage rows: refuse them.

    Ids that are not on a device yet (a list, a numpy array) are checked on the host: jnp's
    min and max would compile a program for every new shape of input."""
    if not isinstance(input_ids, jax.Array):
        input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    if isinstance(input_ids, jax.core.Tracer):
        return input_ids
    if input_ids.size:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
                             "check the tokenizer matches this checkpoint")
    return jnp.asarray(input_ids)


def check_positions(config, length: int, what: str = "the input", positions=None) -> None:
    """Raise when a model with learned positions (GPT-2) would be asked for one it does not
    have; warn once when a RoPE model goes past `max_position_embeddings`.

    `length` counts the tokens of the sequence (for generation: the prompt and the new tokens),
    `what` names it in the message; given concrete `positions`, their largest value counts.
    """
    last = length - 1
    if positions is not None and not isinstance(positions, jax.core.Tracer):
        positions = np.asarray(positions)
        last = int(positions.max()) if positions.size else -1
    limit = config.learned_positions
    if limit is not None:
        if last >= limit:
            raise ValueError(f"{what} needs {last + 1} positions, and this GPT-2 learned "
                             f"{limit} (n_positions): give it at most {limit} tokens")
    elif last >= config.max_position_embeddings:
        warn_once(f"positions {config.max_position_embeddings}",
                  f"{what} needs {last + 1} positions, more than max_position_embeddings="
                  f"{config.max_position_embeddings}, the length this model was trained for; "
                  "RoPE goes on past it, but the output may degrade")


def on_mesh(mesh):
    """Trace under `mesh`, the one the weights live on (`mesh_of`, which walks the weights:
    a caller that steps many times reads it once), so the model's sharding constraints
    apply; None: no mesh."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
