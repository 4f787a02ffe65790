"""Fully sharded data parallelism on 8 fake CPU devices (a DxFxT mesh): the training loss and its
gradients equal one device's, each device holds 1/(F x T) of the weights and optimizer state
(read off the arrays), the compiled step gathers weights and reduces gradients over `fsdp` and
nothing else, and a run's checkpoint moves between FSDP, tensor parallelism and one device."""

import functools
import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mistral_jax
from mistral_jax.arch import configs
from mistral_jax.base import trees
from mistral_jax.io import lora
from mistral_jax.model import registry as models
from mistral_jax.parallel import sharding
from train.compute import step as S
from train.input import data as D
from train.run.checkpoints import RunCheckpoints

# 4 kv heads and a vocab of 64, so that every model axis here splits every weight (no
# replicated kv heads, no vocab padding): the bytes each device holds are exactly its share.
CONFIG = configs.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                               head_dim=4, sliding_window=None, max_position_embeddings=64)
IDS = np.random.default_rng(0).integers(1, 64, (8, 16)).astype(np.int32)  # D x F <= 8 rows
TARGETS, RANK = ["q", "v", "down"], 2


def mesh(spec):
    return mistral_jax.make_mesh(spec, jax.devices()[: math.prod(sharding.parse_mesh(spec))])


@functools.cache
def base():
    """CONFIG with numpy's draws in init's layout (no random program compiled per shape)."""
    model = models.abstract(CONFIG)
    rng = np.random.default_rng(1)

    def draw(path, x):
        ones = "norm" in str(path[-1].key)
        return jnp.asarray(ones + 0.05 * rng.standard_normal(x.shape, np.float32))

    return trees.with_weights(model, jax.tree.map_with_path(draw, trees.weights(model)))


def batch(m):
    """IDS as the trainer's data loader places a batch of one micro-batch on mesh `m`."""
    rows = D.Rows(IDS, IDS, np.broadcast_to(np.arange(16), IDS.shape).astype(np.int32),
                  np.zeros_like(IDS))
    return D.place(rows, np.arange(8)[None], NamedSharding(
        m, P(None, sharding.split_over(m, sharding.BATCH), None)))


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def training(spec, with_lora=False):
    """(mesh, params, frozen, loss) as train/run/loop.py sets a run up: full tuning, or LoRA
    adapters (A and B both drawn non-zero, so that every gradient is) beside a frozen base."""
    m = mesh(spec)
    model = mistral_jax.shard(base(), m)
    weights = trees.weights(model)
    template = trees.with_weights(model, abstract(weights))
    if not with_lora:
        return m, weights, {}, S.causal_lm_loss(template, dtype=jnp.float32,
                                                assemble=lambda p, f: p)
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda x: jax.device_put(
        0.1 * rng.standard_normal(x.shape, np.float32), x.sharding),
        lora.init(weights, trees.logical_axes(model), TARGETS, RANK, 0, m))
    adapted = lora.attach(template, abstract(params), 2.0)
    return m, params, weights, S.causal_lm_loss(adapted, dtype=jnp.float32,
                                                assemble=lora.beside)


def loss_and_grads(spec, with_lora=False):
    m, params, frozen, loss = training(spec, with_lora)
    with jax.set_mesh(m):
        (total, (count, _)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            params, frozen, jax.tree.map(lambda x: x[0], batch(m)))
    return float(total / count), jax.tree.map(lambda g: g / count, grads)  # as the step does


@functools.cache
def reference(with_lora):
    return loss_and_grads("1x1", with_lora)


# F = 8; F x T = 2 x 4; all three axes; and LoRA on the last two (on 1x8x1 it would add nothing
# they do not: its adapters shard on the same embed axis as the weights).
@pytest.mark.parametrize("spec, with_lora", [("1x8x1", False), ("1x2x4", False),
                                             ("2x2x2", False), ("1x2x4", True), ("2x2x2", True)],
                         ids=["1x8x1", "1x2x4", "2x2x2", "lora-1x2x4", "lora-2x2x2"])
def test_loss_and_gradients_equal_one_devices(spec, with_lora):
    loss, grads = reference(with_lora)
    got_loss, got_grads = loss_and_grads(spec, with_lora)
    assert abs(got_loss - loss) <= 1e-6
    for (name, a), b in zip(trees.flatten(got_grads).items(), trees.flatten(grads).values(),
                            strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0,
                                   err_msg=name)


def first_state(spec):
    m, params, frozen, loss = training(spec)
    tx = S.optimizer(lr=1e-2, warmup=0, steps=10, weight_decay=0.1, clip=1.0)
    shardings = S.state_shardings(params, tx, m)
    return m, S.init_state(params, tx, 0, shardings), tx, shardings, loss


def bytes_per_device(tree) -> Counter:
    held = Counter()
    for x in jax.tree.leaves(tree):
        for piece in x.addressable_shards:
            held[piece.device] += piece.data.nbytes
    return held


@pytest.mark.parametrize("spec", ["1x8x1", "1x2x4", "8x1"])
def test_each_device_holds_its_share_of_weights_and_optimizer_state(spec):
    """Weights and both AdamW moments on each device, exactly: the matrices' total / (F x T),
    the norm scales' / F (Megatron keeps them whole over the model axis), the optimizer's step
    counters whole (scalars). 8x1, plain data parallelism, holds all of it on every device."""
    _, state, _, _, _ = first_state(spec)
    _, fsdp, tp = sharding.parse_mesh(spec)
    leaves = jax.tree.leaves_with_path((state.params, state.opt_state))
    assert len([x for _, x in leaves if x.ndim]) == 3 * len(jax.tree.leaves(state.params))
    norm = lambda path: "norm" in jax.tree_util.keystr(path)  # noqa: E731
    share = sum(x.nbytes // (1 if not x.ndim else fsdp if norm(path) else fsdp * tp)
                for path, x in leaves)
    held = bytes_per_device((state.params, state.opt_state))
    assert len(held) == 8 and set(held.values()) == {share}
    matrices = sum(x.nbytes for path, x in leaves if x.ndim and not norm(path))
    assert share < matrices / (fsdp * tp) * 1.1  # the norms and counters: a few percent here


def hlo_ops(hlo: str) -> dict[str, tuple[str, str]]:
    """Each instruction's name -> (its result type, its line)."""
    ops = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?(%[\w.-]+) = (\(.*?\)|\w+\[[\d,]*\])", line)
        if m:
            ops[m.group(1)] = (m.group(2), line)
    return ops


def shape_of(hlo_type: str) -> tuple[int, ...]:
    dims = re.match(r"\w+\[([\d,]*)\]", hlo_type).group(1)
    return tuple(int(d) for d in dims.split(",") if d)


def readers(ops, name):
    return [(n, t) for n, (t, line) in ops.items()
            if n != name and re.search(rf"{re.escape(name)}\b[,)]", line)]


def test_the_step_gathers_weights_and_reduces_their_gradients_over_fsdp_only():
    """The trainer's compiled step on 1x8x1, read in its HLO: every all-gather collects a whole
    weight (a layer's, inside the loop over layers, or an unstacked one), every weight is
    gathered, and every all-reduce sums either scalars (the loss, the token count, the norm)
    or a weight's whole gradient that is read only to cut this device's 1/8 of it. XLA's GPU
    and TPU compilers rewrite that all-reduce-then-cut into a reduce-scatter (their
    ReduceScatterCreator pass); its CPU compiler, which these fake devices run, does not. No
    activation crosses devices."""
    m, state, tx, shardings, loss = first_state("1x8x1")
    step = S.make_train_step(tx, shardings, loss)
    with jax.set_mesh(m):
        hlo = step.lower(state, {}, batch(m)).compile().as_text()
    # each weight's shape as the loop over layers sees it -> how many layers its stack holds
    # (a layer's norm and the final norm share a shape: both counts)
    layers: dict[tuple, set] = {}
    for name, x in trees.flatten(state.params).items():
        stacked = name.startswith("layers.")
        layers.setdefault(tuple(x.shape[1:] if stacked else x.shape), set()).add(
            CONFIG.num_hidden_layers if stacked else 1)
    weights = set(layers)
    ops = hlo_ops(hlo)
    gathered = [shape_of(t) for t, line in ops.values() if re.search(r" all-gather\(", line)]
    assert set(gathered) == weights
    counts = sharding.count_collectives(hlo)
    assert counts["all-gather"] == len(gathered) and counts["reduce-scatter"] == 0
    assert counts["all-to-all"] == counts["collective-permute"] == 0
    reduced = [(n, t) for n, (t, line) in ops.items() if re.search(r" all-reduce\(", line)]
    assert len(reduced) == counts["all-reduce"]
    gradients = 0
    for name, hlo_type in reduced:
        parts = ([(name, hlo_type)] if not hlo_type.startswith("(") else readers(ops, name))
        for part, part_type in parts:  # a tuple's elements, through its get-tuple-elements
            shape = shape_of(part_type)
            if math.prod(shape) == 1:
                continue
            assert shape in weights, f"{part} sums a {part_type} that is no weight's gradient"
            gradients += 1
            # read into this device's 1/8: of the layer stack inside the loop, or of the weight
            pieces = {math.prod(shape) // 8 * n for n in layers[shape]}
            cuts = {math.prod(shape_of(t)) for _, t in readers(ops, part)}
            assert cuts and cuts <= pieces, (part, part_type, cuts)
    assert gradients == len(trees.flatten(state.params))  # each weight's, once


@pytest.mark.parametrize("saved_on, restored_on", [("1x8x1", "1x1x8"), ("1x2x4", "1x1"),
                                                   ("1x1", "2x2x2")])
def test_a_runs_checkpoint_restores_exactly_on_another_mesh(tmp_path, saved_on, restored_on):
    """FSDP -> tensor parallel, FSDP x TP -> one device, one device -> all three axes: the
    state (weights, AdamW moments, step, key) bit for bit, in the new mesh's shards."""
    _, state, *_ = first_state(saved_on)
    rng = np.random.default_rng(3)
    state = jax.tree.map(lambda x: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype),
                                                  x.sharding)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x, state)  # not zeros
    saved = RunCheckpoints(tmp_path, 1)
    saved.save(1, state, {"position": 8})
    saved.close()
    _, like, *_ = first_state(restored_on)
    restored = RunCheckpoints(tmp_path, 1)
    got, record = restored.restore(1, like)
    restored.close()
    assert record == {"position": 8}
    for a, b, want in zip(jax.tree.leaves(got), jax.tree.leaves(state), jax.tree.leaves(like),
                          strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == want.sharding
