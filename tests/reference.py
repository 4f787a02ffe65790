"""Tiny random Hugging Face torch models saved in a tmp dir: the reference our parity tests use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from convert import hf
from convert.parity import random_hf_model
from mistral_jax import models


def hf_model(kind: str, path: Path | None = None, *, seed: int = 0, dtype=torch.float32,
             safe_serialization: bool = True, **overrides):
    """A random HF model of `kind` (see convert.parity.TINY); saved to `path` when given."""
    model = random_hf_model(kind, seed=seed, **overrides).to(dtype)
    if path is not None:
        model.save_pretrained(path, safe_serialization=safe_serialization)
    return model


def ours(path: Path, dtype=None):
    """Our model from the HF folder `path`, through the converter."""
    config, weights = hf.convert(path, dtype)
    return models.with_weights(models.abstract(config), weights)


def torch_logits(model, ids, mask=None, positions=None) -> np.ndarray:
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(mask))
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions)).long()
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(ids)).long(), **kwargs)
    return out.logits.float().numpy()
