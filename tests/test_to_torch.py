"""Export back to a Hugging Face folder: transformers loads it and gives the same logits."""

import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import mistral_jax
from convert import from_torch, to_torch
from mistral_jax.base import trees
from tests.reference import hf_model, torch_logits

IDS = np.random.default_rng(0).integers(0, 96, (2, 12))


@pytest.mark.parametrize("kind,overrides", [
    ("mistral", {}), ("mistral", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    ("llama", {}), ("gpt2", {}), ("gpt2", {"tie_word_embeddings": False})])
def test_export_loads_in_transformers_with_equal_logits(kind, overrides, tmp_path):
    model = hf_model(kind, tmp_path / "hf", **overrides)
    assert from_torch.main([str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert to_torch.main([str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert np.max(np.abs(torch_logits(again, IDS) - torch_logits(model, IDS))) <= 1e-5


def test_export_of_a_trained_bfloat16_checkpoint(tmp_path):
    params = mistral_jax.init(mistral_jax.preset("gpt2-tiny"), seed=4)
    mistral_jax.save(params, tmp_path / "ckpt")
    bf16 = mistral_jax.load(tmp_path / "ckpt", dtype=jnp.bfloat16)
    mistral_jax.save(bf16, tmp_path / "ckpt16")
    to_torch.export(tmp_path / "ckpt16", tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert again.dtype == torch.bfloat16
    ours = np.asarray(mistral_jax.forward(bf16, IDS))
    theirs = torch_logits(again.float(), IDS)
    assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.9
    with pytest.raises(FileExistsError, match="already exists"):
        to_torch.export(tmp_path / "ckpt16", tmp_path / "back")
    assert to_torch.main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1


@pytest.mark.parametrize("preset", ["mistral-tiny", "gpt2-tiny"])
def test_round_trip_ours_to_hf_to_ours_is_exact(preset, tmp_path):
    params = mistral_jax.init(mistral_jax.preset(preset), seed=7)
    mistral_jax.save(params, tmp_path / "ckpt")
    to_torch.export(tmp_path / "ckpt", tmp_path / "hf")
    assert from_torch.main([str(tmp_path / "hf"), str(tmp_path / "again")]) == 0
    again = mistral_jax.load(tmp_path / "again")
    assert again.config == params.config
    before = trees.flatten(trees.weights(params))
    after = trees.flatten(trees.weights(again))
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert np.array_equal(np.asarray(value), np.asarray(after[name])), name


def test_every_exported_file_takes_its_mode_from_the_umask(tiny_ckpt, tmp_path):
    """model.safetensors as well as config.json and the tokenizer (safetensors alone would
    write it 0600); an unusual umask, so that a fixed 0644 would not pass either."""
    old = os.umask(0o027)
    try:
        assert to_torch.main([str(tiny_ckpt), str(tmp_path / "back")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "back").iterdir()}
    assert sorted(modes) == ["config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json"], modes
    assert set(modes.values()) == {"0o640"}, modes
