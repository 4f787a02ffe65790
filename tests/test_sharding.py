"""Megatron tensor parallelism on 8 fake CPU devices: sharded == unsharded, layouts read off the
arrays, and the collectives XLA compiles counted in the HLO."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax
from mistral_jax.arch import configs
from mistral_jax.base import trees
from mistral_jax.model import registry as models
from mistral_jax.model.apply import on_mesh
from mistral_jax.model.decoder import ACT
from mistral_jax.model.options import with_options
from mistral_jax.nn.masking import Masking
from mistral_jax.parallel import sharding

# 1x4 was here too, and showed nothing 1x8 does not (24 s a model of the suite's time)
MESHES = ["1x2", "1x8", "2x4", "8x1"]
# 8 query heads so every mesh divides them; 2 kv heads so 1x8 replicates kv heads;
# a vocab of 100 so any model axis > 1 pads it (to 128 * tp).
MISTRAL = configs.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                sliding_window=4, max_position_embeddings=64, rms_norm_eps=1e-6)
GPT2 = configs.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=8, n_positions=64,
                          tie_word_embeddings=False)
# 16 tokens: a sequence the largest model axis (8) splits, for the sequence-parallel cases
IDS = np.random.default_rng(0).integers(0, 100, (8, 16)).astype(np.int32)
MASK = np.ones_like(IDS)
MASK[1, :3] = 0  # a left-padded row


def mesh(spec):
    return mistral_jax.make_mesh(spec, jax.devices()[: math.prod(sharding.parse_mesh(spec))])


@functools.cache
def perturbed(config):
    """A random model whose norms and biases are not all ones and zeros: init's layout (norm
    scales near 1, all else near 0) with numpy's draws of 0.1 (no random-normal program to
    compile per weight shape). Built once per config: the tests read it and shard copies."""
    model = models.abstract(config)
    rng = np.random.default_rng(2)

    def draw(path, x):
        name = str(path[-1].key)
        scale = ("norm" in name or name.startswith("ln")) and not name.endswith("bias")
        return jnp.asarray(scale + 0.1 * rng.standard_normal(x.shape, np.float32), np.float32)

    return trees.with_weights(model, jax.tree.map_with_path(draw, trees.weights(model)))


def loss_and_grads(model):
    """`loss` on IDS / MASK and its gradients (vocab rows cut back to the config's), from one
    program jitted on the model's mesh: one compilation where loss and an eager jax.grad
    compiled three programs and dozens of small ones. (Taking forward's logits as aux too made
    one program that compiled slower than forward's and this one apart.)"""
    vocab = model.config.vocab_size

    @jax.jit
    def run(m):
        loss, grads = jax.value_and_grad(lambda m: mistral_jax.loss(m, IDS, MASK))(m)
        return loss, trees.resize_vocab(trees.weights(grads), trees.logical_axes(m), vocab)

    with on_mesh(sharding.mesh_of(model)):  # as loss traces: under the weights' mesh
        return run(model)


def logits_loss_and_grads(model):
    return mistral_jax.forward(model, IDS, MASK), *loss_and_grads(model)


@pytest.fixture(scope="module", params=[MISTRAL, GPT2], ids=["mistral", "gpt2"])
def reference(request):
    model = perturbed(request.param)
    return (model, *logits_loss_and_grads(model))


# kv heads split (1x2), kv heads replicated (1x8), data x model (2x4), data only (8x1); and
# sequence parallelism (activations split on the sequence between blocks) with kv heads
# replicated and with a data axis. Dropped: 1x1 (no mesh: blockwise == the materialized scores,
# which test_attention proves for the model and its gradients) and 1x2 with sequence
# parallelism (its kv-head split is 1x2's, its sequence split 1x8-sp's and 2x4-sp's).
CASES = [*MESHES, "1x8-sp", "2x4-sp"]


@pytest.mark.parametrize("spec", CASES)
def test_sharded_logits_loss_and_grads_equal_unsharded(reference, spec):
    """The reference runs the materialized scores (auto, at 16 tokens); the sharded model
    blockwise attention in blocks of 4 (per device, under shard_map): both paths at once."""
    model, logits, loss, grads = reference
    sharded = mistral_jax.shard(model, mesh(spec.removesuffix("-sp")),
                                sequence_parallel=spec.endswith("-sp"))
    sharded = with_options(sharded, attention="blockwise", attention_blocks=(4, 4))
    got_logits, got_loss, got_grads = logits_loss_and_grads(sharded)
    assert got_logits.shape == logits.shape
    # padding positions too: a query that sees no key averages every value on both paths
    np.testing.assert_allclose(got_logits, logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_loss, loss, atol=1e-6, rtol=0)
    for (name, a), b in zip(trees.flatten(got_grads).items(), trees.flatten(grads).values(),
                            strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


def shard_shapes(model):
    """Each weight's per-device shape, read off the arrays themselves."""
    weights = trees.flatten(trees.weights(model))
    shapes = {}
    for name, x in weights.items():
        per_device = {s.data.shape for s in x.addressable_shards}
        assert len(per_device) == 1, name
        assert len(x.addressable_shards) == len(jax.devices()[: x.sharding.num_devices])
        shapes[name] = per_device.pop()
    return shapes


def test_each_weight_is_split_the_megatron_way_on_1x8():
    m = mistral_jax.shard(perturbed(MISTRAL), mesh("1x8"))
    # Megatron: column-parallel q / gate / up, row-parallel o / down, vocab-parallel embed / head;
    # 2 kv heads cannot split 8 ways, so k / v are whole on every device.
    assert m.vocab_padded == 1024
    assert shard_shapes(m) == {
        "embed": (128, 64), "lm_head": (64, 128), "norm": (64,),
        "layers.attn_norm": (2, 64), "layers.mlp_norm": (2, 64),
        "layers.q": (2, 64, 1, 8), "layers.k": (2, 64, 2, 8), "layers.v": (2, 64, 2, 8),
        "layers.o": (2, 1, 8, 64),
        "layers.gate": (2, 64, 16), "layers.up": (2, 64, 16), "layers.down": (2, 16, 64),
    }
    g = mistral_jax.shard(perturbed(GPT2), mesh("2x4"))
    shapes = shard_shapes(g)
    assert g.vocab_padded == 100  # 4 divides 100: no padding needed
    assert shapes["embed"] == (25, 64) and shapes["pos_embed"] == (64, 64)
    assert shapes["layers.q"] == (2, 64, 2, 8) and shapes["layers.q_bias"] == (2, 2, 8)
    assert shapes["layers.o"] == (2, 2, 8, 64) and shapes["layers.o_bias"] == (2, 64)
    assert shapes["layers.fc"] == (2, 64, 64) and shapes["layers.fc_bias"] == (2, 64)
    assert shapes["layers.proj"] == (2, 64, 64) and shapes["layers.proj_bias"] == (2, 64)
    # 2x4: the two data-parallel rows of devices hold the same model shards
    q = g.layers.q[...]
    assert {s.replica_id for s in q.addressable_shards} == {0, 1}


collectives = sharding.count_collectives


@pytest.mark.parametrize("config", [MISTRAL, GPT2], ids=["mistral", "gpt2"])
@pytest.mark.parametrize("spec", ["1x8", "2x4"])
@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_one_layer_forward_has_two_all_reduces_and_gathers_no_weight(config, spec, attention):
    m = with_options(mistral_jax.shard(perturbed(config), mesh(spec)), attention=attention)
    layer = jax.tree.map(lambda x: x[0], m.layers)  # one layer's weights, still sharded
    x = jnp.ones((8, 12, 64))
    positions = jnp.broadcast_to(jnp.arange(12), (8, 12))
    masking = Masking(jnp.ones((8, 12), bool), None, config.sliding_window)
    with jax.set_mesh(m.embed[...].sharding.mesh):
        attend = m.attend_with(masking)
        f = jax.jit(lambda w, x: m.constrain(m.block(w, x, positions, attend)[0], ACT))
        hlo = f.lower(layer, x).compile().as_text()
    assert collectives(hlo) == {"all-reduce": 2, "all-gather": 0, "reduce-scatter": 0,
                                "all-to-all": 0, "collective-permute": 0}


@pytest.mark.parametrize("config", [MISTRAL, GPT2], ids=["mistral", "gpt2"])
def test_loss_and_its_gradient_never_gather_the_logits(config):
    m = mistral_jax.shard(perturbed(config), mesh("2x4"))
    with jax.set_mesh(m.embed[...].sharding.mesh):
        step = jax.jit(jax.value_and_grad(lambda m, ids: m.loss(ids)))
        hlo = step.lower(m, IDS).compile().as_text()
    gathered = [tuple(map(int, shape.split(","))) for shape in
                re.findall(r"= \w+\[([\d,]+)\]\S* all-gather(?:-start)?\(", hlo)]
    vocab = {m.config.vocab_size, m.vocab_padded}
    assert not [s for s in gathered if vocab & set(s)]  # no logits, no embedding, no LM head
    # the one gather there is: Mistral's replicated k and v weights collect their grads
    assert gathered == ([(2, 64, 2, 8)] * 2 if config is MISTRAL else [])
    # The all-reduces, as XLA combines them at the pinned jax (a new one is a change to read):
    # the layer loop's forward (attention and MLP outputs) and backward bodies; the
    # vocab-parallel embedding, the loss's max, sum of exponentials and label logit over the
    # vocab shards, and the head's input gradient; the data axis's sums of the gradients and
    # the token count. Mistral's replicated kv heads add their own.
    assert collectives(hlo) == {"all-reduce": 13 if config is MISTRAL else 11,
                                "all-gather": len(gathered), "reduce-scatter": 0,
                                "all-to-all": 0, "collective-permute": 0}


# saved from FSDP x tensor parallel shards (1x2x4; 2x4 held the same shards twice) or one device
@pytest.mark.parametrize("saved_on", ["1x2x4", "1x1"])
def test_checkpoint_saved_on_one_mesh_restores_on_every_other(reference, saved_on, tmp_path):
    """Every mesh (tensor, data, fully sharded data parallel) gets the saved weights bit for bit
    (read in numpy: nothing to compile per mesh), its vocab padding zeros; one of them, 1x8,
    runs the reference's logits."""
    model, logits, _, _ = reference
    mistral_jax.save(mistral_jax.shard(model, mesh(saved_on)), tmp_path / "c")
    saved = trees.flatten(trees.weights(model))
    axes = trees.flatten(trees.logical_axes(model))
    for spec in ["1x1", "1x8", "2x4", "8x1", "1x8x1", "2x2x2"]:
        restored = mistral_jax.load(tmp_path / "c", mesh=mesh(spec))
        assert sharding.mesh_of(restored) is (None if spec == "1x1" else restored.embed[...]
                                              .sharding.mesh)
        for name, x in trees.flatten(trees.weights(restored)).items():
            x, want = np.asarray(x), np.asarray(saved[name])
            if "vocab" in axes[name]:  # padded to a multiple of 128 x the model axis
                i = axes[name].index("vocab")
                assert x.shape[i] == restored.vocab_padded, (spec, name)
                np.testing.assert_array_equal(np.take(x, range(want.shape[i], x.shape[i]), i),
                                              0, err_msg=f"{spec} {name}")
                x = np.take(x, range(want.shape[i]), i)
            np.testing.assert_array_equal(x, want, err_msg=f"{spec} {name}")
    restored = mistral_jax.load(tmp_path / "c", mesh=mesh("1x8"))
    np.testing.assert_allclose(mistral_jax.forward(restored, IDS, MASK), logits, atol=1e-5,
                               rtol=0)
    assert restored.layers.o[...].addressable_shards[0].data.shape == (2, 1, 8, 64)


# --- bad input -----------------------------------------------------------------------------------


def test_mesh_strings_and_device_counts():
    for bad in ["8", "1x", "axb", "0x8", "1x-2", "2x2x2x1", "1x0x8"]:
        with pytest.raises(sharding.ShardingError, match="is not DxT or DxFxT with positive"):
            mistral_jax.make_mesh(bad)
    with pytest.raises(sharding.ShardingError, match="needs 16 devices and 8 cpu devices are "
                       "there; pick sizes whose product is at most 8"):
        mistral_jax.make_mesh("2x8")
    assert dict(mistral_jax.make_mesh("2x4").shape) == {"data": 2, "fsdp": 1, "model": 4}
    assert dict(mistral_jax.make_mesh("1x4x2").shape) == {"data": 1, "fsdp": 4, "model": 2}


def test_a_mesh_smaller_than_the_machine_takes_the_first_devices(capsys):
    mesh = mistral_jax.make_mesh("1x2")
    assert list(mesh.devices.flat) == jax.devices()[:2]
    assert capsys.readouterr().err == "note: mesh 1x2 uses the first 2 of the 8 cpu devices\n"
    model = mistral_jax.shard(perturbed(MISTRAL), mesh)
    assert model.layers.q[...].sharding.mesh.devices.size == 2


def test_head_counts_that_do_not_divide():
    with pytest.raises(sharding.ShardingError, match="num_attention_heads=4 is not divisible"):
        mistral_jax.shard(perturbed(configs.preset("mistral-tiny")), mesh("1x8"))
    odd_kv = configs.MistralConfig(vocab_size=64, hidden_size=48, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=6,
                                   num_key_value_heads=3)
    with pytest.raises(sharding.ShardingError, match="num_key_value_heads=3 and the model axis 2"):
        mistral_jax.shard(perturbed(odd_kv), mesh("1x2"))


def test_rules_table_refuses_collisions():
    rules = sharding.ShardingRules(embed="model")
    with pytest.raises(sharding.ShardingError, match="one mesh axis may shard only one"):
        rules.spec(("embed", "heads", "head_dim"))


# --- sequence parallelism ------------------------------------------------------------------------

# (sharded == unsharded with sequence parallelism: the "-sp" cases of the parity test above)


@pytest.mark.parametrize("config", [MISTRAL, GPT2], ids=["mistral", "gpt2"])
def test_sequence_parallel_layer_trades_all_reduces_for_reduce_scatter_and_all_gather(config):
    m = mistral_jax.shard(perturbed(config), mesh("1x8"), sequence_parallel=True)
    layer = jax.tree.map(lambda x: x[0], m.layers)
    positions = jnp.broadcast_to(jnp.arange(16), (4, 16))
    masking = Masking(jnp.ones((4, 16), bool), None, config.sliding_window)
    with jax.set_mesh(m.embed[...].sharding.mesh):
        x = jax.device_put(jnp.ones((4, 16, 64)), jax.sharding.PartitionSpec(None, "model"))
        attend = m.attend_with(masking)
        f = jax.jit(lambda w, x: m.constrain(m.block(w, x, positions, attend)[0], ACT))
        hlo = f.lower(layer, x).compile().as_text()
    counts = collectives(hlo)
    # two all-gathers of the activations on the sequence, entering attention and the MLP
    gathers = re.findall(r"= f32\[4,16,64\]\S* all-gather\(.*dimensions=\{1\}", hlo)
    assert counts["all-gather"] == len(gathers) == 2
    # two reduce-scatters leaving them; XLA's CPU backend writes each as an all-reduce whose
    # result is read only to cut this device's [4, 16 / 8, 64] piece (indexed by partition-id)
    if counts["reduce-scatter"] != 2:
        reduced = re.findall(r"(%all-reduce[.\d]*) = f32\[4,16,64\]", hlo)
        assert counts["reduce-scatter"] == 0 and len(reduced) == counts["all-reduce"] == 2
        for name in reduced:
            readers = [line for line in hlo.splitlines() if re.search(rf"{name}\b[,)]", line)]
            assert readers and all("= f32[4,2,64]" in r and "%partition-id" in r for r in readers)
    assert counts["all-to-all"] == counts["collective-permute"] == 0


def test_sharded_init_creates_each_weight_in_its_shard():
    direct = mistral_jax.init(MISTRAL, seed=3, mesh=mesh("1x8"))
    assert direct.vocab_padded == 1024
    assert shard_shapes(direct)["layers.up"] == (2, 64, 16)
    assert shard_shapes(direct)["embed"] == (128, 64)
    whole = models.init(MISTRAL, seed=3, vocab_padded=1024)
    for (name, a), b in zip(trees.flatten(trees.weights(direct)).items(),
                            trees.flatten(trees.weights(whole)).values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)  # same draws
