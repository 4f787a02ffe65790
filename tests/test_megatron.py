"""Megatron-LM GPT-2 checkpoints, written in Megatron's own layout (tests/megatron_reference.py:
every checkpoint version, tensor-parallel and pipeline shards, NGC zip, Megatron-Core names),
converted and compared with a torch forward written from that layout. Bad input and torch
pickles that ask for more than weights: test_megatron_errors.py."""

import json
import tempfile
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mistral_jax
from convert import from_torch
from convert.formats import megatron
from tests.fetch import byte_level_bpe
from tests.megatron_reference import (
    FFN,
    HEADS,
    IDS,
    LAYERS,
    PADDED,
    POSITIONS,
    D,
    fails,
    megatron_args,
    megatron_forward,
    ours,
    save_megatron,
    tanh_gelu,
)


@pytest.mark.parametrize("version", [0, 1.0, 2.0, 3.0])
def test_every_version_and_tensor_parallel_split_gives_megatrons_logits(
        megatron_tensors, version, tmp_path):
    expected = megatron_forward(megatron_tensors, version, F.gelu, IDS)
    logits = {}
    for tp in (1, 2, 4):
        src = save_megatron(tmp_path / f"tp{tp}", megatron_tensors, version, tp=tp)
        logits[tp], conversion = ours(src)
        assert conversion.config.activation_function == "gelu"  # args: neither tanh flag
        assert conversion.config.vocab_size == PADDED and conversion.tokenizer is None
    assert np.abs(logits[1] - expected).max() <= 1e-4
    for tp in (2, 4):
        np.testing.assert_allclose(logits[tp], logits[1], atol=1e-6, rtol=0)


def test_full_conversion_of_pipeline_and_tensor_shards_loads(megatron_tensors, tmp_path):
    """TP 2 x pipeline 2, through the command line into a checkpoint that mistral_jax loads."""
    src = save_megatron(tmp_path / "src", megatron_tensors, 3.0, tp=2, pp=2)
    assert sorted(p.name for p in (src / "iter_0000100").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert from_torch.main([str(src), str(tmp_path / "ckpt"), "--no-progress"]) == 0
    model = mistral_jax.load(tmp_path / "ckpt")
    expected = megatron_forward(megatron_tensors, 3.0, F.gelu, IDS)
    assert np.abs(np.asarray(mistral_jax.forward(model, IDS)) - expected).max() <= 1e-4
    assert model.config.tie_word_embeddings and model.config.n_layer == LAYERS


@pytest.mark.parametrize("legacy_pickle", [True, False], ids=["torch<1.6-pickle", "zip-pickle"])
def test_ngc_zip_without_args(megatron_tensors, legacy_pickle, tmp_path, monkeypatch):
    """NVIDIA's release: a zip of release/mp_rank_00/model_optim_rng.pt (2019: torch's pre-1.6
    pickle format), version 0, 2019 names, no args (so the heads come from a flag) and
    Megatron's tanh GELU of that time. The member is extracted, mapped, and removed at once."""
    release = save_megatron(tmp_path / "unzipped", megatron_tensors, 0, args=None, names="old",
                            iteration="release", legacy_pickle=legacy_pickle)
    with zipfile.ZipFile(tmp_path / "megatron_lm_345m_v0.0.zip", "w") as zf:
        for f in sorted(release.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(release).as_posix())
    src = tmp_path / "megatron_lm_345m_v0.0.zip"
    assert megatron.detect(src) and from_torch.detect(src) == "megatron"
    logits, conversion = ours(src, num_attention_heads=HEADS)
    assert conversion.config.activation_function == "gelu_fast"
    assert any("tanh GELU" in n for n in conversion.notes)
    expected = megatron_forward(megatron_tensors, 0, tanh_gelu, IDS)
    assert np.abs(logits - expected).max() <= 1e-4
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    out = from_torch.convert(src, tmp_path / "ckpt", num_attention_heads=HEADS)
    assert not list((tmp_path / "tmp").iterdir())  # the member was extracted, then removed
    np.testing.assert_allclose(
        np.asarray(mistral_jax.forward(mistral_jax.load(out), IDS)), logits, atol=1e-6)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("names", ["core", "te"])
def test_megatron_core_and_transformer_engine_names(megatron_tensors, names, pp, tmp_path):
    """Megatron-Core: decoder.layers.N.self_attention.linear_qkv (layer norm fused in),
    linear_proj, mlp.linear_fc1/2, and on a pipeline's last stage the tied head's synced copy,
    output_layer. Transformer Engine layers: layernorm_qkv, proj, layernorm_mlp.fc1_weight..."""
    src = save_megatron(tmp_path / "src", megatron_tensors, 3.0, tp=2, pp=pp, names=names)
    logits, conversion = ours(src)
    assert conversion.config.tie_word_embeddings
    assert np.abs(logits - megatron_forward(megatron_tensors, 3.0, F.gelu, IDS)).max() <= 1e-4


def test_untied_output_layer(megatron_tensors, tmp_path):
    head = torch.randn(PADDED, D) * 0.2
    w = megatron_tensors | {"output_layer.weight": head}
    src = tmp_path / "src"
    args = megatron_args(2, untie_embeddings_and_output_weights=True)
    save_megatron(src, w, 3.0, tp=2, args=args, names="core")
    logits, conversion = ours(src)
    assert not conversion.config.tie_word_embeddings
    expected = megatron_forward(megatron_tensors, 3.0, F.gelu, IDS, output_layer=head)
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.parametrize("flags, activation", [
    ({"openai_gelu": True}, "gelu_fast"), ({"bias_gelu_fusion": True}, "gelu_fast"),
    ({"openai_gelu": True, "bias_gelu_fusion": True}, "gelu_fast"), ({}, "gelu")])
def test_activation_from_args(megatron_tensors, flags, activation, tmp_path):
    src = save_megatron(tmp_path, megatron_tensors, 3.0, args=megatron_args(**flags))
    logits, conversion = ours(src)
    assert conversion.config.activation_function == activation
    gelu = tanh_gelu if activation == "gelu_fast" else F.gelu
    assert np.abs(logits - megatron_forward(megatron_tensors, 3.0, gelu, IDS)).max() <= 1e-4


def test_sizes_from_a_config_file_and_flags(megatron_tensors, tmp_path):
    src = save_megatron(tmp_path / "src", megatron_tensors, 2.0, args=None)
    (tmp_path / "sizes.json").write_text(json.dumps({"num_attention_heads": HEADS,
                                                     "bias_gelu_fusion": False}))
    logits, conversion = ours(src, megatron_config=str(tmp_path / "sizes.json"))
    assert conversion.config.activation_function == "gelu"
    assert np.abs(logits - megatron_forward(megatron_tensors, 2.0, F.gelu, IDS)).max() <= 1e-4
    _, conversion = ours(src, num_attention_heads=HEADS, activation="gelu")
    c = conversion.config
    assert (c.n_layer, c.n_embd, c.n_positions, c.n_inner, c.n_head) == (
        LAYERS, D, POSITIONS, FFN, HEADS)


def test_vocab_and_merges_trim_the_padded_vocab(megatron_tensors, tmp_path):
    texts = ["Megatron pads the vocabulary to a multiple of 128 times the TP size.",
             "The padding rows are never produced by the tokenizer."] * 3
    byte_level_bpe(texts, 300, ["<|endoftext|>"]).model.save(str(tmp_path))
    src = save_megatron(tmp_path / "src", megatron_tensors, 1.0, tp=4)
    vocab = len(json.loads((tmp_path / "vocab.json").read_text()))
    assert 257 <= vocab < PADDED and IDS.max() < vocab
    out = tmp_path / "ckpt"
    assert from_torch.main([str(src), str(out), "--no-progress",
                            "--vocab-file", str(tmp_path / "vocab.json"),
                            "--merge-file", str(tmp_path / "merges.txt")]) == 0
    fails(src, tmp_path / "out2", "--vocab-file", str(tmp_path / "vocab.json"),
          match="--vocab-file and --merge-file go together")
    model = mistral_jax.load(out)
    assert model.config.vocab_size == vocab == model.tokenizer.vocab_size
    assert model.config.eos_token_id == model.tokenizer.piece_to_id("<|endoftext|>")
    expected = megatron_forward(megatron_tensors, 1.0, F.gelu, IDS)[..., :vocab]
    assert np.abs(np.asarray(mistral_jax.forward(model, IDS)) - expected).max() <= 1e-4


def test_any_path_into_the_checkpoint(megatron_tensors, tmp_path):
    src = save_megatron(tmp_path / "src", megatron_tensors, 2.0, tp=2)
    reference, _ = ours(src)
    iteration = src / "iter_0000100"
    for path in (iteration, iteration / "mp_rank_01", iteration / "mp_rank_00" /
                 "model_optim_rng.pt"):
        np.testing.assert_array_equal(ours(path)[0], reference)
