"""Int8 weights and the int8 KV cache on tiny random models: an int8 model computes what the float
model of its dequantized weights computes, checkpoints keep it int8, the scales shard with their
columns (read off the arrays on 8 fake CPU devices), and the decode step's kernel path (layer
weights read in place) equals the plain forward."""

import functools
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax
from mistral_jax import kernels
from mistral_jax.arch import configs
from mistral_jax.arch import weights as weight_tables
from mistral_jax.base import trees
from mistral_jax.model import cache as kv
from mistral_jax.model import registry as models
from mistral_jax.model.options import with_options
from mistral_jax.parallel import sharding
from mistral_jax.quant import int8 as quant

MISTRAL = configs.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                sliding_window=None, max_position_embeddings=64,
                                tie_word_embeddings=True)
GPT2 = configs.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=8, n_positions=64,
                          tie_word_embeddings=False)
IDS = np.random.default_rng(0).integers(0, 100, (2, 10)).astype(np.int32)


@functools.cache
def drawn(config):
    """The weights init would draw (normal(0, initializer_range), ones, zeros, as the weight
    table says), numpy's draws: no random program for XLA to compile per weight shape."""
    rng = np.random.default_rng(3)
    inits = {w.short: w.init for w in weight_tables.table(config)}

    def draw(path, x):
        init = inits[str(path[-1].key)]
        if init != "normal":
            return np.full(x.shape, init == "ones", np.float32)
        return config.initializer_range * rng.standard_normal(x.shape, np.float32)

    return jax.tree.map_with_path(draw, trees.weights(models.abstract(config)))


def model(config):
    """A new random model (a test may change it in place: each call is its own)."""
    return trees.with_weights(models.abstract(config),
                              jax.tree.map(jnp.asarray, drawn(config)))


@partial(jax.jit, static_argnames="fresh")
def step(m, ids, cache, start, fresh=False):
    """`Decoder.step` on a [b, c] chunk of ids at `start`, no padding."""
    b, c = ids.shape
    positions = start + jnp.tile(jnp.arange(c), (b, 1))
    return m.step(ids, jnp.ones((b, c), jnp.int32), positions, cache, start, fresh=fresh)


@pytest.mark.parametrize("layout,lead,n_in,shape", [
    ("kn", 0, 1, (64, 24)), ("kn", 1, 2, (3, 4, 16, 40)), ("nk", 0, 1, (50, 64))])
@pytest.mark.parametrize("group", [None, 32])
def test_quantize_round_trip_within_half_a_step(layout, lead, n_in, shape, group):
    w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    values, scale = quant.quantize(w, lead, n_in, layout, group)
    assert values.dtype == np.int8 and np.abs(values).max() == 127
    back = quant.dequantize(values, scale, lead, n_in, layout)
    k = quant.input_size(shape, lead, n_in, layout)
    assert scale.shape == quant.scale_shape(shape, lead, n_in, layout, 1 if group is None
                                            else k // group)
    step = np.asarray(quant.dequantize(np.ones_like(values), scale, lead, n_in, layout))
    assert np.all(np.abs(np.asarray(back) - w) <= step / 2 + 1e-7)
    jv, js = quant.quantize(jnp.asarray(w), lead, n_in, layout, group)  # numpy and jax agree
    np.testing.assert_array_equal(np.asarray(jv), values)


@pytest.mark.parametrize("config", [MISTRAL, GPT2], ids=["mistral", "gpt2"])
def test_int8_model_computes_its_dequantized_weights(config):
    float_model = model(config)
    q = quant.quantized(float_model)
    flat = trees.flatten(trees.weights(q))
    for name in quant.table(config):
        if name in flat:
            assert flat[name + ".values"].dtype == jnp.int8
            assert flat[name + ".scale"].dtype == jnp.float32
    assert q.dtype == jnp.float32 and quant.is_quantized(q)
    got = np.asarray(mistral_jax.forward(q, IDS))
    same = np.asarray(mistral_jax.forward(quant.dequantized(q), IDS))
    np.testing.assert_allclose(got, same, atol=2e-5)
    # and int8 is near the float model: about 1% of the logits' size on random weights
    ref = np.asarray(mistral_jax.forward(float_model, IDS))
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


@pytest.mark.parametrize("config", [MISTRAL, GPT2], ids=["mistral", "gpt2"])
@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_decode_step_in_the_kernel_equals_the_forward(config, weights):
    """`Decoder.step` on int8 / bf16 weights reads each layer in place through the CPU kernel
    (or its XLA reference where no compiler is); its logits are the forward's."""
    m = quant.quantized(model(config)) if weights == "int8" else \
        trees.with_weights(model(config), jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                       trees.weights(model(config))))
    assert quant.kernel_ok(m) == kernels.available()
    full = np.asarray(mistral_jax.forward(m, IDS), np.float32)
    cache = kv.KVCache.create(config, 2, 16, m.dtype)
    logits, cache = step(m, IDS[:, :6], cache, 0, fresh=True)
    for t in range(6, 10):
        logits, cache = step(m, IDS[:, t:t + 1], cache, t)
        tol = 2e-4 if weights == "int8" else 0.05 * np.abs(full).max()
        np.testing.assert_allclose(np.asarray(logits[:, :100], np.float32), full[:, t],
                                   atol=tol)


def test_int8_checkpoint_round_trip_and_load_quantize(tmp_path):
    float_model = model(MISTRAL)
    mistral_jax.save(float_model, tmp_path / "f32")
    q = mistral_jax.load(tmp_path / "f32", quantize="int8")
    assert quant.is_quantized(q)
    mistral_jax.save(q, tmp_path / "int8")
    back = mistral_jax.load(tmp_path / "int8")
    for name, x in trees.flatten(trees.weights(q)).items():
        y = trees.flatten(trees.weights(back))[name]
        assert y.dtype == x.dtype, name
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    with pytest.raises(quant.QuantError, match="quantize='int4'"):
        mistral_jax.load(tmp_path / "f32", quantize="int4")


def test_scales_shard_with_their_columns_on_1x8(tmp_path):
    mistral_jax.save(quant.quantized(model(MISTRAL)), tmp_path / "int8")
    mesh = sharding.make_mesh("1x8")
    m = mistral_jax.load(tmp_path / "int8", mesh=mesh)
    shapes = {}
    for name, x in trees.flatten(trees.weights(m)).items():
        per_device = {s.data.shape for s in x.addressable_shards}
        assert len(per_device) == 1 and len(x.addressable_shards) == 8, name
        shapes[name] = per_device.pop()
    # q and gate/up are column-parallel: their int8 columns and their scales split 8 ways;
    # o and down are row-parallel: int8 rows split, scales (one per output) whole; the
    # vocab-parallel table's rows and their scales split together (vocab padded to 1024)
    shapes = quant.stored(shapes)  # as a checkpoint names them: q and q_scale
    assert shapes["layers.q"] == (2, 64, 1, 8) and shapes["layers.q_scale"] == (2, 1, 1, 8)
    assert shapes["layers.gate"] == (2, 64, 16) and shapes["layers.gate_scale"] == (2, 1, 16)
    assert shapes["layers.down"] == (2, 16, 64) and shapes["layers.down_scale"] == (2, 1, 64)
    assert shapes["layers.o"] == (2, 1, 8, 64) and shapes["layers.o_scale"] == (2, 1, 64)
    assert shapes["embed"] == (128, 64) and shapes["embed_scale"] == (128, 1)
    assert m.layers.q.values[...].dtype == jnp.int8
    one = mistral_jax.load(tmp_path / "int8")
    np.testing.assert_allclose(np.asarray(mistral_jax.forward(m, IDS)),
                               np.asarray(mistral_jax.forward(one, IDS)), atol=1e-4)
    # the int8 cache's scales shard like its keys: the decode step on the sharded int8 weights
    # (the float cache's generation on a mesh is test_generate's)
    m, one = (with_options(x, kv_cache_dtype="int8") for x in (m, one))
    np.testing.assert_array_equal(mistral_jax.generate_tokens(m, IDS, max_new_tokens=6),
                                  mistral_jax.generate_tokens(one, IDS, max_new_tokens=6))


def test_quantizing_a_sharded_model_keeps_it_sharded():
    mesh = sharding.make_mesh("2x4")
    m = quant.quantized(mistral_jax.shard(model(MISTRAL), mesh))
    assert m.layers.q.scale[...].sharding.spec == jax.sharding.PartitionSpec(
        None, None, "model", None)
    assert m.layers.q.values[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "model",
                                                                              None)


def test_int8_kv_cache_is_close_and_small():
    m = model(MISTRAL)
    want = mistral_jax.generate_tokens(m, IDS, max_new_tokens=8)
    got = mistral_jax.generate_tokens(with_options(m, kv_cache_dtype="int8"), IDS,
                                      max_new_tokens=8)
    assert (got == want).mean() >= 0.75  # random weights: near-ties may flip
    f32 = kv.KVCache.create(MISTRAL, 4, 256, jnp.float32)
    bf16 = kv.KVCache.create(MISTRAL, 4, 256, jnp.bfloat16)
    int8 = kv.KVCache.create(MISTRAL, 4, 256, jnp.int8)
    kv_bytes = lambda c: c.nbytes() - c.index.nbytes  # noqa: E731
    h = MISTRAL.head_dim  # 8 here: a float32 scale per head and token, 4 bytes beside h
    assert kv_bytes(int8) / kv_bytes(bf16) == (h + 4) / (2 * h)
    assert kv_bytes(int8) / kv_bytes(f32) == (h + 4) / (4 * h)


def test_int8_kv_cache_rolling_buffer_matches_float_logits():
    """A window of 8 and 20 tokens: the rolling buffer wraps; int8 keys and values give the
    float cache's logits to int8 rounding."""
    config = configs.MistralConfig(**{**MISTRAL.__dict__, "sliding_window": 8})
    m = model(config)
    ids = np.random.default_rng(2).integers(0, 100, (1, 20)).astype(np.int32)

    def run(dtype):
        cache = kv.KVCache.create(config, 1, 20, dtype)
        out = []
        for t in range(20):
            logits, cache = step(m, ids[:, t:t + 1], cache, t)
            out.append(np.asarray(logits[:, :100]))
        return np.stack(out), cache

    ref, _ = run(jnp.float32)
    got, cache = run(jnp.int8)
    assert cache.slots == 8 and cache.k.dtype == jnp.int8
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    np.testing.assert_allclose(ref[:, 0], np.asarray(mistral_jax.forward(m, ids))[0], atol=1e-4)


def test_bad_kv_cache_dtype_is_refused(tmp_path):
    mistral_jax.save(model(MISTRAL), tmp_path / "m")
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        mistral_jax.load(tmp_path / "m", kv_cache_dtype="int4")
    assert mistral_jax.load(tmp_path / "m", kv_cache_dtype="int8").kv_cache_dtype == "int8"


def test_int8_checkpoint_takes_adapters_beside_its_weights(tmp_path):
    """Not merged (an int8 W + A B would be requantized): the layer adds (x A) B to x W."""
    from mistral_jax.io import lora

    q = quant.quantized(model(MISTRAL))
    mistral_jax.save(q, tmp_path / "q")
    adapters = lora.init(trees.weights(q), trees.logical_axes(q), ["q", "down"], 2, 0)
    adapters["layers"]["q"]["b"] = jnp.ones_like(adapters["layers"]["q"]["b"])
    lora.write(adapters, tmp_path / "a", rank=2, alpha=4.0, targets=["q", "down"],
               config=MISTRAL, base=None)
    loaded = mistral_jax.load(tmp_path / "q", adapters=tmp_path / "a")
    assert loaded.layers.q.values[...].dtype == jnp.int8
    np.testing.assert_allclose(mistral_jax.forward(loaded, IDS),
                               mistral_jax.forward(lora.attach(q, adapters, 2.0), IDS), atol=1e-6)
    assert np.abs(mistral_jax.forward(loaded, IDS) - mistral_jax.forward(q, IDS)).max() > 1e-3


def test_kernel_off_uses_xla(tmp_path):
    """MISTRAL_JAX_CPU_KERNEL=off: the same generation through XLA's dequantizing dot."""
    mistral_jax.save(quant.quantized(model(MISTRAL)), tmp_path / "q")
    code = ("import sys, numpy as np, mistral_jax; from mistral_jax.quant import int8 as quant; "
            f"m = mistral_jax.load({str(tmp_path / 'q')!r}); assert not quant.kernel_ok(m); "
            f"print(mistral_jax.generate_tokens(m, np.array({IDS.tolist()}), "
            "max_new_tokens=6).tolist())")
    env = {**__import__("os").environ, "MISTRAL_JAX_CPU_KERNEL": "off"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    here = mistral_jax.generate_tokens(mistral_jax.load(tmp_path / "q"), IDS, max_new_tokens=6)
    assert eval(out) == here.tolist()


def test_an_int8_checkpoint_exports_dequantized_and_refuses_training(tmp_path, capsys):
    import torch
    import transformers

    from convert import to_torch
    from train import finetune

    q = quant.quantized(model(MISTRAL))
    mistral_jax.save(q, tmp_path / "q")
    to_torch.export(tmp_path / "q", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = theirs(torch.tensor(IDS).long()).logits.numpy()
    np.testing.assert_allclose(logits, np.asarray(mistral_jax.forward(q, IDS)), atol=1e-4)
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n')
    code = finetune.main(["--init", str(tmp_path / "q"), "--data", str(tmp_path / "d.jsonl"),
                          "--out", str(tmp_path / "run")])
    assert code != 0 and not (tmp_path / "run").exists()
    assert "holds int8 weights" in capsys.readouterr().err


def test_mixed_dtypes_decode_in_the_kernel_as_in_xla(monkeypatch):
    """A bfloat16 embedding over float32 layers: every matmul weight is one the kernel reads,
    so the decode step takes it, and gives XLA's greedy tokens."""
    m = model(MISTRAL)
    m.embed[...] = m.embed[...].astype(jnp.bfloat16)
    assert quant.kernel_ok(m) == kernels.available()
    got = mistral_jax.generate_tokens(m, IDS, max_new_tokens=6)
    monkeypatch.setenv("MISTRAL_JAX_CPU_KERNEL", "off")
    jax.clear_caches()
    assert not quant.kernel_ok(m)
    np.testing.assert_array_equal(got, mistral_jax.generate_tokens(m, IDS, max_new_tokens=6))
