"""Hugging Face folders (GPT2LMHeadModel, MistralForCausalLM, LlamaForCausalLM) -> our weights.

Each architecture is a table: HF key (with `{i}` for the layer) -> our weight name(s) and the
transform from torch's layout to ours. Torch `Linear` stores [out, in]; GPT-2's `Conv1D` stores
[in, out] and fuses q|k|v in `c_attn`. Heads become an explicit axis here, once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from convert.tensors import ConversionError, KeyMap, Plan, TensorSource
from mistral_jax.configs import Config, GPT2Config, from_hf_dict
from mistral_jax.tokenizer import Tokenizer


def _heads_in(c: Config, heads: str):  # torch [n*h, d] -> ours [d, n, h]
    return lambda w: w.T.reshape(c.hidden_size, getattr(c, heads), c.head_dim)


def mistral_keymap(c: Config) -> KeyMap:
    d, n, h = c.hidden_size, c.num_attention_heads, c.head_dim
    layer = "model.layers.{i}."
    return {
        "model.embed_tokens.weight": ("embed", lambda w: w),
        layer + "input_layernorm.weight": ("layers.attn_norm", lambda w: w),
        layer + "self_attn.q_proj.weight": ("layers.q", _heads_in(c, "num_attention_heads")),
        layer + "self_attn.k_proj.weight": ("layers.k", _heads_in(c, "num_key_value_heads")),
        layer + "self_attn.v_proj.weight": ("layers.v", _heads_in(c, "num_key_value_heads")),
        layer + "self_attn.o_proj.weight": ("layers.o", lambda w: w.T.reshape(n, h, d)),
        layer + "post_attention_layernorm.weight": ("layers.mlp_norm", lambda w: w),
        layer + "mlp.gate_proj.weight": ("layers.gate", lambda w: w.T),
        layer + "mlp.up_proj.weight": ("layers.up", lambda w: w.T),
        layer + "mlp.down_proj.weight": ("layers.down", lambda w: w.T),
        "model.norm.weight": ("norm", lambda w: w),
        "lm_head.weight": ("lm_head", lambda w: w.T),
    }


def gpt2_keymap(c: GPT2Config) -> KeyMap:
    d, n, h = c.n_embd, c.n_head, c.head_dim
    layer = "h.{i}."
    split_w = lambda w: tuple(x.reshape(d, n, h) for x in np.split(w, 3, axis=1))  # [d, 3d]
    split_b = lambda b: tuple(x.reshape(n, h) for x in np.split(b, 3))
    return {
        "wte.weight": ("embed", lambda w: w),
        "wpe.weight": ("pos_embed", lambda w: w),
        layer + "ln_1.weight": ("layers.ln1_scale", lambda w: w),
        layer + "ln_1.bias": ("layers.ln1_bias", lambda w: w),
        layer + "attn.c_attn.weight": (("layers.q", "layers.k", "layers.v"), split_w),
        layer + "attn.c_attn.bias": (("layers.q_bias", "layers.k_bias", "layers.v_bias"), split_b),
        layer + "attn.c_proj.weight": ("layers.o", lambda w: w.reshape(n, h, d)),
        layer + "attn.c_proj.bias": ("layers.o_bias", lambda w: w),
        layer + "ln_2.weight": ("layers.ln2_scale", lambda w: w),
        layer + "ln_2.bias": ("layers.ln2_bias", lambda w: w),
        layer + "mlp.c_fc.weight": ("layers.fc", lambda w: w),
        layer + "mlp.c_fc.bias": ("layers.fc_bias", lambda w: w),
        layer + "mlp.c_proj.weight": ("layers.proj", lambda w: w),
        layer + "mlp.c_proj.bias": ("layers.proj_bias", lambda w: w),
        "ln_f.weight": ("norm_scale", lambda w: w),
        "ln_f.bias": ("norm_bias", lambda w: w),
        "lm_head.weight": ("lm_head", lambda w: w.T),
    }


# Buffers some checkpoints carry that are not weights (causal-mask tables, RoPE frequencies).
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(
        (path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json",
                                      "pytorch_model.bin", "pytorch_model.bin.index.json"))


def read_config(path: Path) -> Config:
    try:
        return from_hf_dict(json.loads((path / "config.json").read_text()))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path / 'config.json'}: {e}") from e


def plan(path: Path) -> Plan:
    """How the HF folder `path` maps onto our weights."""
    config = read_config(path)
    source = TensorSource.from_hf_folder(path)
    if isinstance(config, GPT2Config):
        # GPT2LMHeadModel prefixes the body with "transformer."; bare GPT2Model files do not.
        keymap = {("transformer." + k if k != "lm_head.weight" else k): v
                  for k, v in gpt2_keymap(config).items()}
        if not any(k.startswith("transformer.") for k in source.keys()):
            keymap = gpt2_keymap(config)
    else:
        keymap = mistral_keymap(config)
    ignore = [k for k in source.keys() if _IGNORED.search(k)]
    if config.tie_word_embeddings:  # transformers may save the tied head; it is the embedding
        ignore.append("lm_head.weight")
    return Plan(config, source, keymap, ignore, Tokenizer.from_dir(path),
                origin=str(path / "config.json"))


def convert(path: Path, dtype=None) -> tuple[Config, dict]:
    """The config and the nested dict of numpy weights of the HF folder `path`, in memory."""
    p = plan(path)
    return p.config, p.weights(dtype)
