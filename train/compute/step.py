"""The training step: AdamW (Loshchilov & Hutter 2019) with linear warmup and cosine decay, no
weight decay on norms and biases, gradient clipping, gradient accumulation over micro-batches,
float32 master weights with an optional bfloat16 compute copy, non-finite steps skipped.

The state is donated, so the weights and the optimizer moments are updated in place; the step
compiles once (tests/test_train_step.py reads the jitted step's own cache).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.base import trees


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    """What a checkpoint holds besides the data position: all of it lives on the devices."""

    params: dict  # the trained weights (all of the model's, or the LoRA adapters), float32
    opt_state: optax.OptState
    step: jax.Array  # [] int32: optimizer steps taken (skipped ones included)
    key: jax.Array  # PRNG key data [2] uint32, split once per step for anything random


def no_decay(name: str) -> bool:
    """Norm scales and biases are not decayed (as in GPT-3 and Megatron)."""
    return "norm" in name or name.startswith("ln") or name.endswith("bias")


def decay_mask(params: dict) -> dict:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not no_decay(str(getattr(path[-1], "key", path[-1]))), params)


def optimizer(*, lr: float, warmup: int, steps: int, weight_decay: float, clip: float,
              b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW under warmup + cosine decay to lr / 10."""
    schedule = learning_rate(lr=lr, warmup=warmup, steps=steps)
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay,
                    mask=decay_mask))


def learning_rate(*, lr: float, warmup: int, steps: int) -> optax.Schedule:
    warmup = min(warmup, steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)


def cast(tree, dtype):
    """Floating-point leaves in `dtype` (the compute copy; gradients flow back in float32)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


def loss_terms(template, weights: dict, batch: dict, isolate_documents: bool):
    """(summed token loss, counted tokens) of one micro-batch."""
    model = trees.with_weights(template, weights)
    segments = batch["segments"] if isolate_documents else None
    return model.loss_terms(batch["ids"], batch["labels"], batch["positions"], segments)


# A loss: `loss(params, frozen, micro_batch) -> (summed loss, (count, {name: summed value}))`.
# The step divides the sum and each named value by the count over the whole batch (tokens for
# the causal LM, pairs for preference tuning), so micro-batches add up to the batch's mean.
Loss = Callable[[dict, dict, dict], tuple[jax.Array, tuple[jax.Array, dict]]]


def causal_lm_loss(template, *, dtype, assemble: Callable[[dict, dict], dict],
                   isolate_documents: bool = True) -> Loss:
    """Next-token cross-entropy over the counted tokens. `assemble(params, frozen)` gives the
    model's weights (the params themselves for full fine-tuning, base + adapters for LoRA)."""

    def loss(params, frozen, batch):
        weights = cast(assemble(params, frozen), dtype)
        total, count = loss_terms(template, weights, batch, isolate_documents)
        return total, (count, {})

    return loss


def make_train_step(tx: optax.GradientTransformation, shardings: TrainState, loss: Loss):
    """`step(state, frozen, batch) -> (state, metrics)`, jitted with the state donated and
    returned in `shardings` (so the next call finds what it compiled for).

    `batch` leaves are [micro-batches, ...]; metrics: the mean `loss`, `grad_norm`, `finite`,
    `tokens` (the count the loss is averaged over) and the loss's named values, averaged."""
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    replicated = shardings.step

    @partial(jax.jit, donate_argnums=0, out_shardings=(shardings, replicated))
    def step(state: TrainState, frozen: dict, batch: dict):
        def accumulate(carry, micro):
            grads, total, count, named = carry
            (loss_sum, (n, values)), g = grad_fn(state.params, frozen, micro)
            return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n,
                    jax.tree.map(jnp.add, named, values)), None

        if batch["ids"].shape[0] == 1:  # no accumulation: no zeros to add the gradient to
            (total, (count, named)), grads = grad_fn(state.params, frozen,
                                                     jax.tree.map(lambda x: x[0], batch))
        else:
            total, (count, named) = _zero_outputs(loss, state.params, frozen, batch)
            init = (jax.tree.map(jnp.zeros_like, state.params), total, count, named)
            (grads, total, count, named), _ = jax.lax.scan(accumulate, init, batch)
        count = jnp.maximum(count, 1)
        loss_value = total / count
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new = TrainState(keep(params, state.params), keep(opt_state, state.opt_state),
                         state.step + 1, jax.random.key_data(
                             jax.random.split(jax.random.wrap_key_data(state.key))[0]))
        return new, {"loss": loss_value, "grad_norm": grad_norm, "finite": finite,
                     "tokens": count, **{k: v / count for k, v in named.items()}}

    return step


def make_eval_step(loss: Loss):
    """`eval_step(params, frozen, batch) -> (summed loss, count, {name: summed value})` over
    the micro-batches of `batch`."""

    @jax.jit
    def eval_step(params, frozen, batch):
        def one(carry, micro):
            total, (n, named) = loss(params, frozen, micro)
            return jax.tree.map(jnp.add, carry, (total, n, named)), None

        total, (n, named) = _zero_outputs(loss, params, frozen, batch)
        return jax.lax.scan(one, (total, n, named), batch)[0]

    return eval_step


def _zero_outputs(loss: Loss, params, frozen, batch):
    """Zeros shaped as `loss`'s outputs on one micro-batch of `batch`: where sums start."""
    micro = jax.tree.map(lambda x: x[0], batch)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        jax.eval_shape(loss, params, frozen, micro))


def mean_loss(total, count) -> tuple[float, float]:
    """(mean token loss, perplexity) from an eval step's (summed loss, counted tokens)."""
    loss = float(total) / max(int(count), 1)
    return loss, math.exp(min(loss, 50.0))


def state_shardings(params: dict, tx: optax.GradientTransformation, mesh) -> TrainState:
    """Where each part of the state lives: optimizer moments exactly like the params they
    follow, scalars and the key replicated."""
    replicated = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
        transform_non_params=lambda _: replicated)
    return TrainState(param_shardings, opt_shardings, replicated, replicated)


def init_state(params: dict, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
    """The first state, each part placed as `shardings` says."""

    def make(params):
        key = jax.random.key_data(jax.random.key(seed))
        return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), key)

    return jax.jit(make, out_shardings=shardings)(params)
