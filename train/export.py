"""What a run leaves for later use: OUT/final, a plain checkpoint `mistral_jax.load` reads, and
for LoRA runs OUT/adapters (the adapters alone, with adapter_config.json).

Every process takes part (Orbax writes each array from the processes that hold it); the weights
directory is written last and appears whole (Orbax renames it into place), so a directory is a
checkpoint only once it is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mistral_jax import models
from mistral_jax.checkpoint import WEIGHTS
from mistral_jax.configs import to_hf_dict

FINAL, ADAPTERS = "final", "adapters"


def _write_weights(path: Path, weights: dict) -> None:
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / WEIGHTS, weights, force=True)
        ckptr.wait_until_finished()


def _fresh(path: Path) -> None:
    if jax.process_index() == 0:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    _sync(f"fresh {path}")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_model(template, weights: dict, path: Path) -> Path:
    """A plain checkpoint of `template`'s config and tokenizer with `weights` (vocab cut back)."""
    config = template.config
    if template.vocab_padded != config.vocab_size:
        axes = models.logical_axes(template)
        weights = jax.jit(lambda w: models.resize_vocab(w, axes, config.vocab_size))(weights)
    _fresh(path)
    if jax.process_index() == 0:
        (path / "config.json").write_text(json.dumps(to_hf_dict(config), indent=2) + "\n")
        if template.tokenizer is not None:
            template.tokenizer.save(path)
    _write_weights(path, weights)
    return path


def write_adapters(adapters: dict, path: Path, *, rank: int, alpha: float, targets: list[str],
                   base: str | None) -> Path:
    _fresh(path)
    if jax.process_index() == 0:
        info = {"rank": rank, "alpha": alpha, "targets": targets, "base": base}
        (path / "adapter_config.json").write_text(json.dumps(info, indent=2) + "\n")
    _write_weights(path, adapters)
    return path
