"""train/compute/step.py and train/lora.py on a tiny sharded Mistral: accumulation equals one big
batch, one compilation, skipped non-finite steps, remat, unrolled layers and bfloat16 keep the
numbers, packed documents isolated as if alone, and LoRA trains only its adapters."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax
from mistral_jax.arch import configs
from mistral_jax.base import trees
from mistral_jax.io import lora
from mistral_jax.model import registry as models
from mistral_jax.model.options import with_options
from mistral_jax.parallel import sharding
from train.compute import step as S
from train.input import data as D

TINY = configs.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                             head_dim=4, sliding_window=None, max_position_embeddings=64)
IDS = np.random.default_rng(0).integers(1, 64, (4, 16)).astype(np.int32)


def batch_of(ids, mesh, grad_accum=1, labels=None, positions=None, segments=None):
    rows = D.Rows(ids, ids if labels is None else labels,
                  np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int32)
                  if positions is None else positions,
                  np.zeros_like(ids) if segments is None else segments)
    index = np.arange(len(ids)).reshape(grad_accum, -1)
    return D.place(rows, index, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, sharding.BATCH, None)))


def mesh_of(spec):
    return mistral_jax.make_mesh(spec, jax.devices()[: math.prod(sharding.parse_mesh(spec))])


@functools.cache
def tiny(seed=1):
    """TINY as init draws it (normal(0, initializer_range) matrices, unit norms), the draws
    numpy's: no random program (seconds of XLA compilation) for each mesh a test puts it on."""
    model = models.abstract(TINY)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if "norm" in str(path[-1].key):
            return jnp.ones(x.shape, jnp.float32)
        return jnp.asarray(TINY.initializer_range * rng.standard_normal(x.shape, np.float32))

    return trees.with_weights(model, jax.tree.map_with_path(draw, trees.weights(model)))


def parts(spec="1x1", *, dtype=jnp.float32, remat="none", lr=1e-2, unroll=1):
    """(mesh, model, fresh: a new first state, step)."""
    mesh = mesh_of(spec)
    model = mistral_jax.shard(with_options(tiny(), remat=remat, unroll=unroll), mesh)
    params = trees.weights(model)
    tx = S.optimizer(lr=lr, warmup=0, steps=10, weight_decay=0.1, clip=1.0)
    shardings = S.state_shardings(params, tx, mesh)
    step = S.make_train_step(tx, shardings, S.causal_lm_loss(model, dtype=dtype,
                                                             assemble=lambda p, f: p))
    return mesh, model, lambda: S.init_state(params, tx, 0, shardings), step


def setup(spec="1x1", **kwargs):
    mesh, model, fresh, step = parts(spec, **kwargs)
    return mesh, model, fresh(), step


def flat(tree):
    return {k: np.asarray(v) for k, v in trees.flatten(tree).items()}


def test_accumulated_micro_batches_equal_one_batch_and_the_step_compiles_once():
    """On 2x4 (data and model axes): the first step's loss is the unsharded model's causal-LM
    loss, and two micro-batches of 2 rows give what one batch of 4 gives, step after step."""
    results = []
    for k in (1, 2):
        mesh, model, state, step = setup("2x4")
        with jax.set_mesh(mesh):
            losses = []
            for _ in range(3):
                state, m = step(state, {}, batch_of(IDS, mesh, grad_accum=k))
                losses.append(float(m["loss"]))
                assert int(m["tokens"]) == 4 * 15
        assert step._cache_size() == 1  # three steps, one compilation
        results.append((losses, flat(state.params)))
    (l1, p1), (l2, p2) = results
    np.testing.assert_allclose(l1[0], mistral_jax.loss(model, IDS), atol=1e-6, rtol=0)
    np.testing.assert_allclose(l1, l2, atol=1e-6, rtol=0)
    assert l1[2] < l1[0]
    # Adam divides by the gradients' scale, so a rounding difference in a tiny gradient moves
    # its weight by a share of a whole step (lr 1e-2): 3e-5 is 0.3% of one step
    for name in p1:
        np.testing.assert_allclose(p1[name], p2[name], atol=3e-5, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def float32_setup():
    """The 1x1 float32 step, compiled once for the tests that run it; `fresh()` a new state
    (the step donates the one it is given)."""
    mesh, _, fresh, step = parts()
    return mesh, step, fresh


def test_a_non_finite_step_is_skipped_and_reported(float32_setup):
    mesh, step, fresh = float32_setup
    state = fresh()
    before = flat(state.params)
    poisoned = {**state.params, "norm": state.params["norm"].at[0].set(jnp.nan)}
    state = S.TrainState(poisoned, state.opt_state, state.step, state.key)
    with jax.set_mesh(mesh):
        state, m = step(state, {}, batch_of(IDS, mesh))
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    after = flat(state.params)
    for name in before:
        if name != "norm":
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert int(state.step) == 1  # counted, not applied
    assert int(state.opt_state[1][0].count) == 0


def test_weight_decay_skips_norms_and_biases():
    mask = S.decay_mask(trees.weights(models.abstract(configs.preset("gpt2-tiny"))))
    flat_mask = trees.flatten(mask)
    assert not flat_mask["layers.ln1_scale"] and not flat_mask["layers.q_bias"]
    assert not flat_mask["norm_bias"] and not flat_mask["norm_scale"]
    assert flat_mask["layers.q"] and flat_mask["embed"] and flat_mask["layers.proj"]


def one_step(spec="1x1", **kwargs):
    mesh, _, state, step = setup(spec, **kwargs)
    with jax.set_mesh(mesh):
        state, m = step(state, {}, batch_of(IDS, mesh))
    return float(m["loss"]), float(m["grad_norm"]), flat(state.params)["layers.q"]


@pytest.fixture(scope="module")
def float32_step(float32_setup):
    mesh, step, fresh = float32_setup
    with jax.set_mesh(mesh):
        state, m = step(fresh(), {}, batch_of(IDS, mesh))
    return float(m["loss"]), float(m["grad_norm"]), flat(state.params)["layers.q"]


def test_remat_and_unrolled_layers_change_memory_not_numbers(float32_step):
    """Each remat kind (nothing saved; dots saved) once, one of them on the 2 layers unrolled
    (no loop; remat then keeps its CSE barrier): one compilation a case. dots_no_batch was a
    case too: it differs from dots only in which dot outputs jax keeps, not in our code."""
    loss, grad_norm, q = float32_step
    for remat, unroll in (("full", 1), ("dots", True)):
        got = one_step(remat=remat, unroll=unroll)
        what = f"remat={remat} unroll={unroll}"
        np.testing.assert_allclose(got[:2], (loss, grad_norm), rtol=1e-6, err_msg=what)
        np.testing.assert_allclose(got[2], q, atol=1e-5, err_msg=what)


def test_bfloat16_compute_keeps_float32_master_weights(float32_step):
    mesh, _, state, step = setup(dtype=jnp.bfloat16)
    with jax.set_mesh(mesh):
        state, m = step(state, {}, batch_of(IDS, mesh))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert abs(float(m["loss"]) - float32_step[0]) < 0.02
    assert float(m["loss"]) != float32_step[0]  # it did compute in bfloat16


def test_isolated_documents_in_one_row_score_as_if_alone():
    model = tiny(seed=3)
    a, b = IDS[0, :7], IDS[1, :9]
    rows = D.pack([(a, np.ones(7, bool)), (b, np.ones(9, bool))], 16, pad_id=0,
                  isolate_documents=True)
    assert rows.ids.tolist() == [np.concatenate([a, b]).tolist()]  # no EOS: ids given as-is
    # one program for every call: a document alone is its row padded to 16 tokens whose labels
    # after it are -100 (not counted; causal attention never lets it see them), and the row
    # not isolated is the packed one as a single document
    loss_terms = jax.jit(lambda m, *args: m.loss_terms(*args))
    positions = np.broadcast_to(np.arange(16, dtype=rows.positions.dtype), rows.positions.shape)
    one_document = np.zeros_like(rows.segments)

    def alone(x):
        ids, labels = np.zeros_like(rows.ids), np.full_like(rows.labels, -100)
        ids[0, :len(x)] = labels[0, :len(x)] = x
        return loss_terms(model, ids, labels, positions, one_document)

    total, count = loss_terms(model, rows.ids, rows.labels, rows.positions, rows.segments)
    alone = [alone(x) for x in (a, b)]
    assert int(count) == sum(int(c) for _, c in alone) == 6 + 8
    np.testing.assert_allclose(total, sum(t for t, _ in alone), rtol=1e-5)
    crossing, _ = loss_terms(model, rows.ids, rows.labels, positions, one_document)
    assert abs(float(crossing) - float(total)) > 1e-3
    assert loss_terms._cache_size() == 1


def test_lora_trains_only_adapters_and_merges_into_plain_weights():
    mesh = mesh_of("1x4")
    model = mistral_jax.shard(tiny(), mesh)
    base = trees.weights(model)
    adapters = lora.init(base, trees.logical_axes(model), ["q", "o", "down"], 2, 0, mesh)
    assert adapters["layers"]["q"]["a"].shape == (2, 32, 2)
    assert adapters["layers"]["q"]["b"].shape == (2, 2, 8, 4)
    assert adapters["layers"]["o"]["a"].shape == (2, 8, 4, 2)
    # the output side of a column-parallel weight splits like it (heads over "model")
    assert adapters["layers"]["q"]["b"].addressable_shards[0].data.shape == (2, 2, 2, 4)
    tx = S.optimizer(lr=1e-2, warmup=0, steps=10, weight_decay=0.0, clip=1.0)
    merge = lambda p, f: lora.merge(f, p, 2.0)
    shardings = S.state_shardings(adapters, tx, mesh)
    state = S.init_state(adapters, tx, 0, shardings)
    step = S.make_train_step(tx, shardings, S.causal_lm_loss(model, dtype=jnp.float32,
                                                             assemble=merge))
    base_before = flat(base)
    with jax.set_mesh(mesh):
        for _ in range(3):
            state, m = step(state, base, batch_of(IDS, mesh))
    assert set(trees.flatten(state.params)) == {f"layers.{t}.{ab}" for t in ("q", "o", "down")
                                                  for ab in "ab"}
    assert np.abs(np.asarray(state.params["layers"]["q"]["b"])).max() > 0
    for name, value in flat(base).items():
        np.testing.assert_array_equal(value, base_before[name], err_msg=name)
    merged = trees.with_weights(model, jax.jit(merge)(state.params, base))
    a, b = (np.asarray(state.params["layers"]["q"][k]) for k in "ab")
    expected_q = base_before["layers.q"] + 2.0 * np.einsum("ldr,lrnh->ldnh", a, b)
    np.testing.assert_allclose(np.asarray(merged.layers.q[...]), expected_q, atol=1e-6)
    assert float(mistral_jax.loss(merged, IDS)) < float(mistral_jax.loss(model, IDS))
