"""arch/weights.py is the one description of each weight, and a model's options are one frozen
object: what is built, sharded, quantized and adapted follows the table, and no transform drops
an option (`quant.dequantized` once reset the KV cache and compute dtypes)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax
from mistral_jax.arch import weights
from mistral_jax.base import trees
from mistral_jax.io import files, lora
from mistral_jax.model import registry
from mistral_jax.model.options import Options, with_options
from mistral_jax.quant import int8 as quant

MISTRAL = mistral_jax.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, sliding_window=None)
GPT2 = mistral_jax.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
UNTIED = dataclasses.replace(MISTRAL, tie_word_embeddings=False)


@pytest.mark.parametrize("config", [MISTRAL, UNTIED, GPT2], ids=["mistral", "untied", "gpt2"])
def test_a_model_holds_exactly_the_table_s_weights(config):
    model = registry.abstract(config, vocab_padded=128)
    shapes = {k: tuple(v.shape) for k, v in trees.flatten(trees.weights(model)).items()}
    axes = trees.flatten(trees.logical_axes(model))
    table = weights.table(config)
    assert shapes == {w.name: weights.shape(w, config, 128) for w in table}
    assert axes == {w.name: w.logical_axes for w in table}
    assert ("lm_head" in shapes) == (not config.tie_word_embeddings)
    assert shapes["embed"][0] == model.vocab_padded == 128


def test_quantization_lora_and_the_config_check_read_the_table():
    assert quant.table(MISTRAL) == {"embed": ("nk", 1), "layers.q": ("kn", 1),
                                    "layers.k": ("kn", 1), "layers.v": ("kn", 1),
                                    "layers.o": ("kn", 2), "layers.gate": ("kn", 1),
                                    "layers.up": ("kn", 1), "layers.down": ("kn", 1),
                                    "lm_head": ("kn", 1)}
    assert set(weights.lora_targets("gpt2")) == {"q", "k", "v", "o", "fc", "proj"}
    assert lora.shapes("o", (2, 4, 8, 32), rank=3) == ((2, 4, 8, 3), (2, 3, 32))
    sized = weights.sized_by("mistral")
    assert sized["num_key_value_heads"] == ("layers.k", 2)
    assert sized["intermediate_size"] == ("layers.gate", 2)
    assert weights.sized_by("gpt2")["n_positions"] == ("pos_embed", 0)


def test_options_are_frozen_and_checked():
    model = registry.init(MISTRAL, options=Options(attention="xla"))
    with pytest.raises(AttributeError):
        model.attention = "blockwise"
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.options.remat = "full"
    with pytest.raises(ValueError, match="remat='some'"):
        Options(remat="some")
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        Options(kv_cache_dtype="int4")
    other = with_options(model, kv_cache_dtype="int8")
    assert (model.kv_cache_dtype, other.kv_cache_dtype, other.attention) == (None, "int8", "xla")
    assert other.embed[...] is model.embed[...]  # the same arrays, not a copy


def test_every_transform_keeps_the_options(tmp_path):
    options = Options(attention="xla", kv_cache_dtype="int8", compute_dtype="float32",
                      remat="full", unroll=2)
    model = registry.init(MISTRAL, options=options)
    assert quant.quantized(model).options == options
    assert quant.dequantized(quant.quantized(model)).options == options
    sharded = mistral_jax.shard(model, mistral_jax.make_mesh("1x2"), sequence_parallel=True)
    assert sharded.options == dataclasses.replace(options, sequence_parallel=True)
    mistral_jax.save(model, tmp_path / "ckpt")
    loaded = mistral_jax.load(tmp_path / "ckpt", options=options, quantize="int8")
    assert loaded.options == options
    assert loaded.layers.q.values[...].dtype == jnp.int8


def test_a_quantized_weight_is_one_node_of_the_tree(tmp_path):
    model = registry.init(MISTRAL)
    q = quant.quantized(model)
    assert isinstance(q.layers.q, quant.Int8) and isinstance(q.embed, quant.Int8)
    names = set(trees.flatten(trees.weights(q)))
    assert {"layers.q.values", "layers.q.scale", "embed.values", "embed.scale"} <= names
    assert not any(n.endswith("_scale") and "norm" not in n for n in names)
    mistral_jax.save(q, tmp_path / "q")  # stored as checkpoints always were: q and q_scale
    stored = trees.flatten(files.stored_shapes(tmp_path / "q" / "weights"))
    assert {"layers.q", "layers.q_scale", "embed", "embed_scale"} <= set(stored)
    back = mistral_jax.load(tmp_path / "q")
    for name, x in trees.flatten(trees.weights(q)).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(
            trees.flatten(trees.weights(back))[name]), err_msg=name)
