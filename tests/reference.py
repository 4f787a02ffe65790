"""Tiny random Hugging Face torch models saved in a tmp dir: the reference our parity tests use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from convert.formats import hf
from convert.parity import random_hf_model
from mistral_jax.base import trees
from mistral_jax.model import registry as models

# A window of 4 and an 8-head layout every mesh divides; larger weights than the default init
# so greedy decoding does not settle on one token (conftest.models_, test_generate).
WINDOWED = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, sliding_window=4,
                initializer_range=0.1)
GPT2_WIDE = dict(n_head=8, n_embd=64, initializer_range=0.3)


def prompt(length, seed=0):
    """[1, length] random token ids in 3..95 (clear of the tiny models' special ids)."""
    return np.random.default_rng(seed).integers(3, 96, (1, length))


def hf_model(kind: str, path: Path | None = None, *, seed: int = 0, dtype=torch.float32,
             safe_serialization: bool = True, **overrides):
    """A random HF model of `kind` (see convert.parity.TINY); saved to `path` when given."""
    model = random_hf_model(kind, seed=seed, **overrides).to(dtype)
    if path is not None:
        model.save_pretrained(path, safe_serialization=safe_serialization)
    return model


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def text_model(path: Path, *, vocab_size: int = 512, **overrides):
    """A tiny random transformers Mistral with a real byte-level BPE (trained on the shipped
    corpus, <s> / </s> as BOS / EOS) and a chat template, saved as an HF folder at `path`."""
    from tests.fetch import byte_level_bpe
    from train.input import default

    bpe = byte_level_bpe(default.entries(default.CORPUS.read_text()[:80000]), vocab_size,
                         ["<s>", "</s>"])
    kwargs = dict(vocab_size=bpe.get_vocab_size(), hidden_size=64, num_attention_heads=8,
                  num_key_value_heads=2, sliding_window=16, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=1, initializer_range=0.1)
    model = hf_model("mistral", path, **{**kwargs, **overrides})
    (path / "tokenizer.json").write_text(bpe.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    return model


def ours(path: Path, dtype=None):
    """Our model from the HF folder `path`, through the converter."""
    config, weights = hf.convert(path, dtype)
    return trees.with_weights(models.abstract(config), weights)


def top1_agreement(got: np.ndarray, ref: np.ndarray, resolution: float = 0.01) -> float:
    """Share of positions where our argmax is the reference's, leaving out those where the
    reference's top two are closer than `resolution` (bfloat16 carries 8 bits: near 1 a logit
    moves by 0.004 when rounded, so such a position is a tie either way)."""
    top2 = np.sort(ref, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] >= resolution
    return float(np.mean((got.argmax(-1) == ref.argmax(-1))[decided]))


def torch_logits(model, ids, mask=None, positions=None) -> np.ndarray:
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(mask))
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions)).long()
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(ids)).long(), **kwargs)
    return out.logits.float().numpy()


def layers_renamed(sd: dict, config, names: dict[str, str], key: str) -> dict:
    """The layer tensors of an HF Llama/Mistral state dict `sd` under another format's names
    (`names`: HF module -> theirs, `key`: e.g. "blk.{i}.{name}.weight"), with the q and k rows
    in interleaved RoPE pairs, as llama.cpp and Mistral's reference code keep them."""
    heads = {"self_attn.q_proj": config.num_attention_heads,
             "self_attn.k_proj": config.num_key_value_heads}
    out = {}
    for i in range(config.num_hidden_layers):
        for hf_name, name in names.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name in heads:  # rotate-halves rows -> interleaved pairs
                rows, d = w.shape
                w = w.reshape(heads[hf_name], 2, rows // heads[hf_name] // 2, d).swapaxes(1, 2)
                w = w.reshape(rows, d)
            out[key.format(i=i, name=name)] = w
    return out
