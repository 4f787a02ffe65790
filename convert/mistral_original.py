"""Mistral's original release format -> our weights: `params.json` + `consolidated.00.pth` (or
several `consolidated.NN.pth` model-parallel shards, or `consolidated.safetensors`) +
`tokenizer.model`.

The reference code applies RoPE to interleaved pairs (x0, x1), (x2, x3), ...; transformers and
this project rotate halves. The q/k rows are permuted once here, as transformers'
`convert_mistral_weights_to_hf.py` does. Model-parallel shards split the column-parallel weights
(wq, wk, wv, w1, w3, output) on dim 0 and the row-parallel ones (wo, w2) and the embedding on
dim 1 (Llama's layout); norms are replicated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convert.hf import _heads_in
from convert.tensors import ConversionError, KeyMap, Plan, TensorSource
from mistral_jax.configs import MistralConfig
from mistral_jax.tokenizer import Tokenizer

DEFAULT_ROPE_THETA = 10000.0  # what Mistral-7B-v0.1 used; its params.json does not say


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


def halves_from_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows [heads * head_dim, d] reordered from RoPE pairs (0, 1), (2, 3), ... to halves."""
    rows, d = w.shape
    return w.reshape(heads, rows // heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def keymap(c: MistralConfig) -> KeyMap:
    d, n, h = c.hidden_size, c.num_attention_heads, c.head_dim
    q_in, k_in = _heads_in(c, "num_attention_heads"), _heads_in(c, "num_key_value_heads")
    layer = "layers.{i}."
    return {
        "tok_embeddings.weight": ("embed", lambda w: w),
        layer + "attention_norm.weight": ("layers.attn_norm", lambda w: w),
        layer + "attention.wq.weight": ("layers.q", lambda w: q_in(halves_from_interleaved(w, n))),
        layer + "attention.wk.weight": ("layers.k", lambda w: k_in(halves_from_interleaved(
            w, c.num_key_value_heads))),
        layer + "attention.wv.weight": ("layers.v", k_in),
        layer + "attention.wo.weight": ("layers.o", lambda w: w.T.reshape(n, h, d)),
        layer + "ffn_norm.weight": ("layers.mlp_norm", lambda w: w),
        layer + "feed_forward.w1.weight": ("layers.gate", lambda w: w.T),
        layer + "feed_forward.w3.weight": ("layers.up", lambda w: w.T),
        layer + "feed_forward.w2.weight": ("layers.down", lambda w: w.T),
        "norm.weight": ("norm", lambda w: w),
        "output.weight": ("lm_head", lambda w: w.T),
    }


class ShardedSource(TensorSource):
    """Tensors merged from model-parallel `consolidated.NN.pth` shards."""

    ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")

    def __init__(self, files: list[Path]):
        self.shards = [TensorSource.from_files([f]) for f in files]
        super().__init__(dict(self.shards[0].files_by_key))

    def get(self, key: str) -> np.ndarray:
        parts = [s.get(key) for s in self.shards]
        if parts[0].ndim == 1:
            return parts[0]  # norms are replicated
        return np.concatenate(parts, axis=1 if key.endswith(self.ROW_PARALLEL) else 0)


def plan(path: Path) -> Plan:
    config = read_config(path)
    files = _weight_files(path)
    source = ShardedSource(files) if len(files) > 1 else TensorSource.from_files(files)
    ignore = [k for k in source.keys() if k.endswith("rope.freqs")]  # a table, not a weight
    notes = []
    if "rope_theta" not in json.loads((path / "params.json").read_text()):
        notes.append(f"{path / 'params.json'} has no rope_theta; using {DEFAULT_ROPE_THETA}, "
                     "Mistral-7B-v0.1's")
    return Plan(config, source, keymap(config), ignore, Tokenizer.from_dir(path), notes,
                origin=str(path / "params.json"))
