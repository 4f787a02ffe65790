"""Tiny random Hugging Face torch models saved in a tmp dir: the reference our parity tests use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from convert import hf
from mistral_jax import models

MISTRAL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
               max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
             rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
GPT2 = dict(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

CLASSES = {
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
}
DEFAULTS = {"mistral": MISTRAL, "llama": LLAMA, "gpt2": GPT2}


def hf_model(kind: str, path: Path | None = None, *, seed: int = 0, dtype=torch.float32,
             safe_serialization: bool = True, **overrides):
    """A random HF model of `kind` (eval mode, eager attention); saved to `path` when given."""
    config_cls, model_cls = CLASSES[kind]
    config = config_cls(**{**DEFAULTS[kind], **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: make them count
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    if path is not None:
        model.save_pretrained(path, safe_serialization=safe_serialization)
    return model


def ours(path: Path, dtype=None):
    """Our model from the HF folder `path`, through the converter."""
    config, weights = hf.convert(path, dtype)
    return models.with_weights(models.abstract(config), weights)


def torch_logits(model, ids, mask=None, positions=None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {}
        if mask is not None:
            kwargs["attention_mask"] = torch.tensor(np.asarray(mask))
        if positions is not None:
            kwargs["position_ids"] = torch.tensor(np.asarray(positions)).long()
        out = model(torch.tensor(np.asarray(ids)).long(), **kwargs)
    return out.logits.float().numpy()
