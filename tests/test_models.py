"""Model structure: stacked layers lower to a program independent of depth; presets; configs."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

import mistral_jax
from mistral_jax.arch import configs
from mistral_jax.base import trees
from mistral_jax.model import registry as models


def train_step_ops(config) -> int:
    """Operations in the lowered (StableHLO) program of a training step of `config`: what XLA
    compiles, so its size stands for the compile time, without the clock of a shared
    machine."""
    model = models.abstract(config)
    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda m, i: m.loss(i)))
    return len(re.findall(r"\bstablehlo\.\w+", step.lower(model, ids).as_text()))


@pytest.mark.parametrize("name", ["mistral-tiny", "gpt2-tiny"])
def test_the_program_to_compile_does_not_grow_with_depth(name):
    """The layers are stacked and run by one loop (scan): 32 layers lower to the very program
    of 2, op for op, so they compile in the same time. Unrolled, each layer would add its
    forward and backward ops."""
    base = configs.preset(name)
    layers_field = "num_hidden_layers" if isinstance(base, configs.MistralConfig) else "n_layer"
    shallow = train_step_ops(dataclasses.replace(base, **{layers_field: 2}))
    deep = train_step_ops(dataclasses.replace(base, **{layers_field: 32}))
    assert deep == shallow > 500, (shallow, deep)


def test_weights_are_stacked_with_heads_as_an_axis():
    m = models.abstract(configs.preset("mistral-7b"))
    shapes = jax.tree.map(lambda x: x.shape, trees.weights(m))
    assert shapes["layers"]["q"] == (32, 4096, 32, 128)
    assert shapes["layers"]["k"] == (32, 4096, 8, 128)
    assert shapes["layers"]["o"] == (32, 32, 128, 4096)
    n = sum(x.size for x in jax.tree.leaves(trees.weights(m)))
    assert n == configs.preset("mistral-7b").num_params() == 7_241_732_096


@pytest.mark.parametrize("name", sorted(configs.PRESETS))
def test_every_preset_builds_and_counts_its_parameters(name):
    config = configs.preset(name)
    n = sum(x.size for x in jax.tree.leaves(trees.weights(models.abstract(config))))
    assert n == config.num_params()


def test_preset_sizes_named_in_comments():
    assert round(configs.preset("mistral-20m").num_params() / 1e6, 1) == 20.3
    assert round(configs.preset("gpt2").num_params() / 1e6) == 124
    assert round(configs.preset("megatron-gpt2-345m").num_params() / 1e6) == 355


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(configs.ConfigError, match="not a multiple of num_key_value_heads=3"):
        configs.MistralConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(configs.ConfigError, match="activation_function='swish'"):
        configs.GPT2Config(activation_function="swish")
    with pytest.raises(configs.ConfigError, match="unknown preset 'mistral-8b'"):
        configs.preset("mistral-8b")
    with pytest.raises(configs.ConfigError, match="RoPE scaling"):
        configs.from_hf_dict({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}})


def test_llama_and_old_style_config_json():
    c = configs.from_hf_dict({"model_type": "llama", "rope_theta": 5e5, "hidden_size": 64,
                              "num_attention_heads": 4, "num_key_value_heads": 4,
                              "eos_token_id": [2, 7]})
    assert c.sliding_window is None and c.rope_theta == 5e5 and c.head_dim == 16
    assert c.eos_token_id == 2


def test_forward_rejects_bad_arguments():
    params = mistral_jax.init(configs.preset("gpt2-tiny"))
    with pytest.raises(ValueError, match=r"must be \[batch, time\]"):
        mistral_jax.forward(params, jnp.arange(4))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        params()
