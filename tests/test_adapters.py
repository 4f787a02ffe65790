"""LoRA adapters that go somewhere: `load(base, adapters=DIR)` (on one device and on a mesh),
`generate --adapters`, `train.merge_lora`, and the PEFT export, loaded with the real `peft`
onto the exported base with our logits, for Mistral and for GPT-2's fused c_attn."""

from __future__ import annotations

import json
import os
import stat

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import mistral_jax
from convert import from_torch, to_torch
from mistral_jax.base import trees
from mistral_jax.cli import generate as generate_cli
from mistral_jax.io import lora
from tests.reference import hf_model
from train import merge_lora

IDS = np.random.default_rng(0).integers(0, 96, (2, 12))
TARGETS = {"mistral": ["q", "k", "v", "o", "gate", "up", "down"],
           "gpt2": ["q", "v", "o", "fc", "proj"]}  # two of c_attn's three parts


def trained_adapters(base, targets, path, *, rank=3, alpha=5.0, seed=1):
    """Adapters with A and B both random, as if trained, written as train.finetune does."""
    # lora.init's shapes and A's scale, drawn by numpy (jax.random compiles a program a shape)
    rng, layers = np.random.default_rng(seed), trees.weights(base)["layers"]
    adapters = {"layers": {}}
    for name in targets:
        a, b = lora.shapes(name, layers[name].shape, rank)
        adapters["layers"][name] = {
            "a": jax.numpy.asarray(rng.standard_normal(a, np.float32) / np.sqrt(np.prod(a[1:-1]),
                                                                               dtype=np.float32)),
            "b": jax.numpy.asarray(0.3 * rng.standard_normal(b, np.float32))}
    lora.write(adapters, path, rank=rank, alpha=alpha, targets=targets, config=base.config,
               base="base")
    return adapters


@pytest.fixture(scope="module", params=["mistral", "gpt2"])
def setup(request, tmp_path_factory):
    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    overrides = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64} \
        if kind == "mistral" else {"n_head": 8, "n_embd": 64}
    hf_model(kind, d / "hf", **overrides)
    assert from_torch.main([str(d / "hf"), str(d / "base")]) == 0
    base = mistral_jax.load(d / "base")
    adapters = trained_adapters(base, TARGETS[kind], d / "adapters")
    return kind, d, base, adapters


def test_load_applies_the_adapters(setup):
    _, d, base, adapters = setup
    adapted = mistral_jax.load(d / "base", adapters=d / "adapters")
    expected = trees.with_weights(base, lora.merge(trees.weights(base), adapters, 5.0 / 3))
    np.testing.assert_allclose(np.asarray(mistral_jax.forward(adapted, IDS)),
                               np.asarray(mistral_jax.forward(expected, IDS)), atol=1e-5)
    assert not np.allclose(np.asarray(mistral_jax.forward(adapted, IDS)),
                           np.asarray(mistral_jax.forward(base, IDS)), atol=1e-3)
    sharded = mistral_jax.load(d / "base", mesh=mistral_jax.make_mesh("2x4"),
                               adapters=d / "adapters")
    assert sharded.layers.q[...].sharding.spec[2] == "model"  # heads still split on the mesh
    np.testing.assert_allclose(np.asarray(mistral_jax.forward(sharded, IDS)),
                               np.asarray(mistral_jax.forward(adapted, IDS)), atol=1e-5)


def test_the_peft_export_loads_in_peft_with_our_logits(setup):
    kind, d, _, _ = setup
    assert to_torch.main([str(d / "base"), str(d / "hf-base")]) == 0
    assert to_torch.main([str(d / "adapters"), str(d / "peft")]) == 0
    config = json.loads((d / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 5.0
    base = transformers.AutoModelForCausalLM.from_pretrained(d / "hf-base").eval()
    theirs = peft.PeftModel.from_pretrained(base, d / "peft").eval()
    modules = 7 if kind == "mistral" else 4  # GPT-2: c_attn (q and v), c_proj, c_fc, c_proj
    assert len([n for n, _ in theirs.named_modules() if n.endswith("lora_A")]) == \
        modules * base.config.num_hidden_layers
    with torch.no_grad():
        expected = theirs(torch.tensor(IDS)).logits.numpy()
    ours = mistral_jax.load(d / "base", adapters=d / "adapters")
    np.testing.assert_allclose(np.asarray(mistral_jax.forward(ours, IDS)), expected, atol=1e-4)


def test_the_peft_export_names_the_hf_base_it_was_given(setup, tmp_path, capsys):
    """--base-model goes into adapter_config.json, so peft's AutoPeftModelForCausalLM loads the
    folder on its own; without it no base is named (not our checkpoint, which transformers
    cannot load) and a note says how to name one; the safetensors file's mode is the umask's."""
    kind, d, _, _ = setup
    assert to_torch.main([str(d / "base"), str(tmp_path / "hf-base")]) == 0
    peft_out = tmp_path / "peft"
    assert to_torch.main([str(d / "adapters"), str(peft_out), "--base-model",
                          str(tmp_path / "hf-base")]) == 0
    config = json.loads((peft_out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "hf-base")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(peft_out).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(IDS)).logits.numpy()
    ours = mistral_jax.load(d / "base", adapters=d / "adapters")
    np.testing.assert_allclose(np.asarray(mistral_jax.forward(ours, IDS)), expected, atol=1e-4)
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in peft_out.iterdir()} == \
        {oct(0o666 & ~umask)}
    capsys.readouterr()

    assert to_torch.main([str(d / "adapters"), str(tmp_path / "unnamed")]) == 0
    config = json.loads((tmp_path / "unnamed" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None
    note = capsys.readouterr().err
    assert note.startswith(f"note: {tmp_path / 'unnamed' / 'adapter_config.json'} names no base "
                           "model") and "--base-model hf-base/" in note and note.count("\n") == 1

    ckpt, not_hf = d / "base", d / "adapters"
    for base, error in ((ckpt, f"--base-model {ckpt} is a mistral_jax checkpoint, which "
                         "transformers cannot load: export it first (python -m convert.to_torch "
                         f"{ckpt} hf-base/) and name the export"),
                        (not_hf, f"--base-model {not_hf} is not a Hugging Face model folder (it "
                         "has no config.json); name the base's export or its Hub id")):
        assert to_torch.main([str(d / "adapters"), str(tmp_path / "refused"), "--base-model",
                              str(base)]) == 1
        assert capsys.readouterr().err == f"error: {error}\n"
    assert to_torch.main([str(d / "base"), str(tmp_path / "refused"), "--base-model",
                          str(tmp_path / "hf-base")]) == 1
    assert "--base-model goes with an adapters directory" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_merge_lora_writes_what_load_applies(setup, tmp_path, capsys):
    _, d, _, _ = setup
    assert merge_lora.main([str(d / "base"), str(d / "adapters"), str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'merged'}\n"
    merged = mistral_jax.load(tmp_path / "merged")
    adapted = mistral_jax.load(d / "base", adapters=d / "adapters")
    for name, value in trees.flatten(trees.weights(merged)).items():
        np.testing.assert_array_equal(np.asarray(value),
                                      np.asarray(trees.flatten(trees.weights(adapted))[name]))
    assert merge_lora.main([str(d / "base"), str(d / "adapters"), str(tmp_path / "merged")]) == 1
    assert "already exists" in capsys.readouterr().err
    np.testing.assert_array_equal(mistral_jax.generate_tokens(merged, IDS, max_new_tokens=5),
                                  mistral_jax.generate_tokens(adapted, IDS, max_new_tokens=5))


def test_adapters_that_do_not_fit_say_so(setup, tmp_path, capsys):
    kind, d, base, _ = setup
    other = mistral_jax.init(mistral_jax.preset("mistral-tiny" if kind == "mistral"
                                                else "gpt2-tiny"))
    mistral_jax.save(other, tmp_path / "other")
    with pytest.raises(mistral_jax.LoraError, match="the adapters do not fit this model "
                       r"\(trained on base\): layers.q.a: shape"):
        mistral_jax.load(tmp_path / "other", adapters=d / "adapters")
    with pytest.raises(mistral_jax.LoraError, match="is not an adapters directory"):
        mistral_jax.load(d / "base", adapters=d / "base")
    assert generate_cli.main([str(d / "base"), "x", "--adapters", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'none'} does not exist (an adapters "
                                       "directory was expected)\n")
