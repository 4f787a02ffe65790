"""Preference tuning's loss: DPO (Rafailov et al. 2023, "Direct Preference Optimization") and
IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences"), as TRL's `DPOTrainer` (1.16) computes them with `loss_type` "sigmoid" and "ipo".

A pair is two rows, chosen and rejected, after the same prompt. A response's log-probability
is the sum of its counted tokens' log-probabilities; with the policy's (pi) and the reference's
(ref) and the log ratio r = pi - ref of each response:

    sigmoid   -log sigmoid(beta * (r_chosen - r_rejected))
    ipo       (r_chosen / n_chosen - r_rejected / n_rejected - 1 / (2 beta))^2

where n is the number of the response's counted tokens: IPO's ratios are averaged over tokens,
as TRL does (its comment says the IPO authors confirmed that their paper's results use this
normalized form; eq. 17 of the paper writes whole-sequence log-probabilities). The loss is the
mean over pairs. Rewards are beta * r of each response (not normalized, for IPO too, as TRL
logs them), their margin chosen - rejected, and accuracy the share of pairs whose chosen reward
is the higher.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.base import trees
from mistral_jax.model.decoder import GATHERED, LOSS_CHUNK
from mistral_jax.nn.layers import IGNORE_INDEX
from train.compute.step import Loss, cast

LOSSES = ("sigmoid", "ipo")
METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "accuracy")


def response_log_probs(template, weights: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(summed log-probability of the counted tokens [m, 2], their number [m, 2]) of the pairs
    `batch` ([m, 2, t] leaves: chosen then rejected); labels[..., i + 1] is predicted at i.
    A row is one right-padded sequence, so plain causal attention keeps the padding out."""
    m, _, t = batch["ids"].shape
    flat = lambda a: a.reshape(m * 2, t)  # [m, 2, t] -> [2m, t]
    model = trees.with_weights(template, weights)
    x, _, _ = model.features(flat(batch["ids"]), None, flat(batch["positions"]))
    labels = flat(batch["labels"])
    labels = jnp.concatenate([labels[:, 1:], jnp.full((m * 2, 1), IGNORE_INDEX, labels.dtype)],
                             axis=1)
    log_probs, counted = _row_log_probs(model, x, labels)
    return log_probs.reshape(m, 2), counted.reshape(m, 2)


def _row_log_probs(model, x, labels):
    """Per row of x [b, t, d]: (summed log-probability of the labels, counted labels), on
    vocab-sharded logits (log-sum-exp minus a one-hot contraction, as the causal LM's loss);
    past LOSS_CHUNK tokens in chunks whose logits are recomputed for the backward pass."""

    def piece(x, labels):
        logits = model.lm_logits(x)  # [b, t, vocab_padded] float32, padded columns at -1e30
        valid = labels != IGNORE_INDEX
        one_hot = jax.nn.one_hot(jnp.where(valid, labels, 0), logits.shape[-1],
                                 dtype=logits.dtype)
        picked = jnp.sum(logits * one_hot, axis=-1) - jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(jnp.where(valid, picked, 0.0), axis=-1), jnp.sum(valid, axis=-1)

    b, t = labels.shape
    if t <= LOSS_CHUNK:
        return piece(x, labels)
    n = -(-t // LOSS_CHUNK)
    x = jnp.pad(x, ((0, 0), (0, n * LOSS_CHUNK - t), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, n * LOSS_CHUNK - t)), constant_values=IGNORE_INDEX)
    chunks = lambda a: jnp.moveaxis(a.reshape(b, n, LOSS_CHUNK, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk(carry, xl):
        got = piece(model.constrain(xl[0], GATHERED), xl[1])
        return jax.tree.map(jnp.add, carry, got), None

    init = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32))
    return jax.lax.scan(chunk, init, (chunks(x), chunks(labels)))[0]


def pair_losses(policy, reference, counted, *, beta: float, kind: str):
    """(loss [m], rewards [m, 2]) from log-probabilities [m, 2] of chosen and rejected."""
    ratio = policy - reference
    if kind == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * (ratio[:, 0] - ratio[:, 1]))
    elif kind == "ipo":
        mean = ratio / jnp.maximum(counted, 1)
        losses = (mean[:, 0] - mean[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {kind!r}; known: {', '.join(LOSSES)}")
    return losses, beta * ratio


def preference_loss(template, *, dtype, assemble: Callable[[dict, dict], dict],
                    base: Callable[[dict], dict] | None, beta: float, kind: str,
                    reference_template=None) -> Loss:
    """The step's loss over a micro-batch of pairs, the policy `template` filled by
    `assemble(params, frozen)`. The reference: with `base` (LoRA), `reference_template` (the
    model without adapters) filled with `base(frozen)` (the frozen base: the same arrays, no
    second copy), run in the step; without, `batch["reference"]` [m, 2], computed before training
    (`make_reference_step`). Pairs with nothing counted (an eval batch's filling) count not."""

    def loss(params, frozen, batch):
        policy, counted = response_log_probs(template, cast(assemble(params, frozen), dtype),
                                             batch)
        if base is None:
            reference = batch["reference"]
        else:
            reference = jax.lax.stop_gradient(
                response_log_probs(reference_template or template, cast(base(frozen), dtype),
                                   batch)[0])
        losses, rewards = pair_losses(policy, reference, counted, beta=beta, kind=kind)
        real = counted[:, 0] > 0
        total = lambda v: jnp.sum(jnp.where(real, v, 0.0))
        named = {"rewards_chosen": total(rewards[:, 0]),
                 "rewards_rejected": total(rewards[:, 1]),
                 "rewards_margin": total(rewards[:, 0] - rewards[:, 1]),
                 "accuracy": total((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32))}
        return total(losses), (jnp.sum(real, dtype=jnp.int32), named)

    return loss


def make_reference_step(template, mesh, *, dtype):
    """`reference(weights, batch) -> [k, m, 2]`: each response's log-probability under
    `weights`, over a batch of k micro-batches of m pairs; replicated, so every process of a
    multi-host run can read it."""

    def reference(weights, batch):
        weights = cast(weights, dtype)
        return jax.lax.map(lambda micro: response_log_probs(template, weights, micro)[0], batch)

    return jax.jit(reference, out_shardings=NamedSharding(mesh, P()))
