"""Mistral's original release format -> our weights: `params.json` + `consolidated.00.pth` (or
several `consolidated.NN.pth` model-parallel shards, or `consolidated.safetensors`) +
`tokenizer.model`.

The reference code applies RoPE to interleaved pairs (x0, x1), (x2, x3), ...; transformers and
this project rotate halves. The q/k rows are permuted once here, as transformers'
`convert_mistral_weights_to_hf.py` does; otherwise the tensors are HF's under other names, so
the key map is HF's renamed. Model-parallel shards split the column-parallel weights
(wq, wk, wv, w1, w3, output) on dim 0 and the row-parallel ones (wo, w2) and the embedding on
dim 1 (Llama's layout); norms are replicated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convert.formats.hf import mistral_keymap
from convert.mapping.conversion import Conversion
from convert.mapping.keymaps import KeyMap, renamed
from convert.mapping.layouts import COLUMN, REPLICATED, ROW, join_shards, rope_halves
from convert.read.errors import ConversionError
from convert.read.sources import TensorSource
from mistral_jax.arch.configs import MistralConfig
from mistral_jax.text.tokenizer import Tokenizer

DEFAULT_ROPE_THETA = 10000.0  # what Mistral-7B-v0.1 used; its params.json does not say


DESCRIPTION = "a Mistral release: params.json with consolidated.*.pth or consolidated.safetensors"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file() and bool(_weight_files(path))


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("consolidated.*.pth")) or sorted(path.glob("consolidated.safetensors"))


def read_config(path: Path) -> MistralConfig:
    params = json.loads((path / "params.json").read_text())
    try:
        dim, n_heads = params["dim"], params["n_heads"]
        return MistralConfig(
            vocab_size=params["vocab_size"], hidden_size=dim,
            intermediate_size=params["hidden_dim"], num_hidden_layers=params["n_layers"],
            num_attention_heads=n_heads, num_key_value_heads=params.get("n_kv_heads", n_heads),
            head_dim=params.get("head_dim", dim // n_heads), rms_norm_eps=params["norm_eps"],
            rope_theta=params.get("rope_theta", DEFAULT_ROPE_THETA),
            sliding_window=params.get("sliding_window"), tie_word_embeddings=False)
    except KeyError as e:
        raise ConversionError(f"{path / 'params.json'} lacks {e.args[0]!r}") from None


# Each key -> the HF Llama key whose tensor it is (after the q/k rows' RoPE permutation).
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# The weights model-parallel shards split on their input (dim 1); the other matrices are split
# on their output (dim 0), the norms replicated.
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def keymap(c: MistralConfig) -> KeyMap:
    """HF's table under this format's names, q/k rows first taken from RoPE's interleaved pairs."""
    return renamed(mistral_keymap(c), HF_NAMES, first={
        "layers.{i}.attention.wq.weight": rope_halves(c.num_attention_heads),
        "layers.{i}.attention.wk.weight": rope_halves(c.num_key_value_heads)})


class ShardedSource(TensorSource):
    """Tensors merged from model-parallel `consolidated.NN.pth` shards."""

    def __init__(self, files: list[Path]):
        self.shards = [TensorSource.from_files([f]) for f in files]
        super().__init__(dict(self.shards[0].files_by_key))

    def get(self, key: str) -> np.ndarray:
        parts = [s.get(key) for s in self.shards]
        split = REPLICATED if parts[0].ndim == 1 else ROW if key.endswith(ROW_PARALLEL) else COLUMN
        return join_shards(parts, split)


def conversion(path: Path) -> Conversion:
    config = read_config(path)
    files = _weight_files(path)
    source = ShardedSource(files) if len(files) > 1 else TensorSource.from_files(files)
    ignore = [k for k in source.keys() if k.endswith("rope.freqs")]  # a table, not a weight
    notes = []
    if "rope_theta" not in json.loads((path / "params.json").read_text()):
        notes.append(f"{path / 'params.json'} has no rope_theta; using {DEFAULT_ROPE_THETA}, "
                     "Mistral-7B-v0.1's")
    return Conversion(config, source, keymap(config), ignore, Tokenizer.from_dir(path),
                      notes, origin=str(path / "params.json"))
