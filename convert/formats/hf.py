"""Hugging Face folders (GPT2LMHeadModel, MistralForCausalLM, LlamaForCausalLM) <-> our weights.

Each architecture is one table: HF key (with `{i}` for the layer) -> our weight name(s) and the
layout between torch's tensor and ours, both ways (convert/mapping/layouts.py): import reads the
table one way, export (convert/to_torch.py) the other. Torch `Linear` stores [out, in]; GPT-2's
`Conv1D` stores [in, out] and fuses q|k|v in `c_attn`. Heads become an explicit axis here, once.
Other formats of the Llama family (Mistral's original release, GGUF) rename their keys onto
`mistral_keymap`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from convert.mapping.conversion import Conversion
from convert.mapping.keymaps import KeyMap
from convert.mapping.layouts import SAME, Layout, linear
from convert.read.errors import ConversionError
from convert.read.sources import TensorSource
from mistral_jax.arch.configs import Config, GPT2Config
from mistral_jax.io import files
from mistral_jax.text.tokenizer import Tokenizer


def mistral_keymap(c: Config) -> KeyMap:
    layer = "model.layers.{i}."
    return {
        "model.embed_tokens.weight": ("embed", SAME),
        layer + "input_layernorm.weight": ("layers.attn_norm", SAME),
        **{layer + f"self_attn.{n}_proj.weight": (f"layers.{n}", linear(c, f"layers.{n}"))
           for n in "qkvo"},
        layer + "post_attention_layernorm.weight": ("layers.mlp_norm", SAME),
        **{layer + f"mlp.{n}_proj.weight": (f"layers.{n}", linear(c, f"layers.{n}"))
           for n in ("gate", "up", "down")},
        "model.norm.weight": ("norm", SAME),
        "lm_head.weight": ("lm_head", linear(c, "lm_head")),
    }


def gpt2_keymap(c: GPT2Config, prefix: str = "transformer.") -> KeyMap:
    """GPT2LMHeadModel's keys: the body under `prefix` ("" for a bare GPT2Model's files)."""
    d, n, h = c.n_embd, c.n_head, c.head_dim
    layer = prefix + "h.{i}."
    c_attn = Layout(  # Conv1D [d, 3d] = q|k|v <-> ours 3 x [d, n, h]
        lambda w: tuple(x.reshape(d, n, h) for x in np.split(w, 3, axis=1)),
        lambda qkv: np.concatenate([x.reshape(d, -1) for x in qkv], axis=1))
    c_attn_bias = Layout(
        lambda b: tuple(x.reshape(n, h) for x in np.split(b, 3)),
        lambda qkv: np.concatenate([x.reshape(-1) for x in qkv]))
    return {
        prefix + "wte.weight": ("embed", SAME),
        prefix + "wpe.weight": ("pos_embed", SAME),
        layer + "ln_1.weight": ("layers.ln1_scale", SAME),
        layer + "ln_1.bias": ("layers.ln1_bias", SAME),
        layer + "attn.c_attn.weight": (("layers.q", "layers.k", "layers.v"), c_attn),
        layer + "attn.c_attn.bias": (("layers.q_bias", "layers.k_bias", "layers.v_bias"),
                                     c_attn_bias),
        layer + "attn.c_proj.weight": ("layers.o", Layout(lambda w: w.reshape(n, h, d),
                                                          lambda w: w.reshape(-1, d))),
        layer + "attn.c_proj.bias": ("layers.o_bias", SAME),
        layer + "ln_2.weight": ("layers.ln2_scale", SAME),
        layer + "ln_2.bias": ("layers.ln2_bias", SAME),
        layer + "mlp.c_fc.weight": ("layers.fc", SAME),
        layer + "mlp.c_fc.bias": ("layers.fc_bias", SAME),
        layer + "mlp.c_proj.weight": ("layers.proj", SAME),
        layer + "mlp.c_proj.bias": ("layers.proj_bias", SAME),
        prefix + "ln_f.weight": ("norm_scale", SAME),
        prefix + "ln_f.bias": ("norm_bias", SAME),
        "lm_head.weight": ("lm_head", linear(c, "lm_head")),
    }


def keymap(config: Config) -> KeyMap:
    """The table of `config`'s architecture, as transformers saves it."""
    return gpt2_keymap(config) if isinstance(config, GPT2Config) else mistral_keymap(config)


# Buffers some checkpoints carry that are not weights (causal-mask tables, RoPE frequencies).
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


DESCRIPTION = ("a Hugging Face model folder: config.json with model.safetensors, a safetensors "
               "index or pytorch_model.bin")


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(
        (path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json",
                                      "pytorch_model.bin", "pytorch_model.bin.index.json"))


def read_config(path: Path) -> Config:
    return files.read_config(path, ConversionError)


def conversion(path: Path) -> Conversion:
    """How the HF folder `path` maps onto our weights."""
    config = read_config(path)
    source = TensorSource.from_hf_folder(path)
    table = keymap(config)
    if isinstance(config, GPT2Config) and not any(k.startswith("transformer.")
                                                  for k in source.keys()):
        table = gpt2_keymap(config, prefix="")  # bare GPT2Model files
    ignore = [k for k in source.keys() if _IGNORED.search(k)]
    if config.tie_word_embeddings:  # transformers may save the tied head; it is the embedding
        ignore.append("lm_head.weight")
    return Conversion(config, source, table, ignore, Tokenizer.from_dir(path),
                      origin=str(path / "config.json"))


def convert(path: Path, dtype=None) -> tuple[Config, dict]:
    """The config and the nested dict of numpy weights of the HF folder `path`, in memory."""
    c = conversion(path)
    return c.config, c.weights(dtype)
