"""Megatron-LM GPT-2 checkpoints, written here in Megatron's own layout (every checkpoint version,
tensor-parallel and pipeline shards, NGC zip, Megatron-Core names), converted and compared with a
torch forward written from that layout; and torch pickles that ask for more than weights."""

import argparse
import contextlib
import io
import json
import os
import random
import re
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mistral_jax
from convert import from_torch
from convert.formats import megatron
from convert.read import megatron_files
from convert.read.errors import ConversionError
from convert.read.pickles import MegatronEnum, load_torch
from mistral_jax.base import trees
from mistral_jax.model import registry as models
from tests.fetch import byte_level_bpe

D, HEADS, FFN, LAYERS, POSITIONS, PADDED = 64, 4, 256, 4, 32, 384
HD = D // HEADS
IDS = np.random.default_rng(0).integers(0, 300, (2, 12))


# --- Megatron's side: weights, their split into shards, and its forward -----------------------

def megatron_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random GPT-2 as Megatron's language_model holds it (legacy names, `encoder.`)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    w = {"embedding.word_embeddings.weight": r(PADDED, D),
         "embedding.position_embeddings.weight": r(POSITIONS, D)}
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + r(D), p + "input_layernorm.bias": r(D),
              p + "self_attention.query_key_value.weight": r(3 * D, D),
              p + "self_attention.query_key_value.bias": r(3 * D),
              p + "self_attention.dense.weight": r(D, D), p + "self_attention.dense.bias": r(D),
              p + "post_attention_layernorm.weight": 1 + r(D),
              p + "post_attention_layernorm.bias": r(D),
              p + "mlp.dense_h_to_4h.weight": r(FFN, D), p + "mlp.dense_h_to_4h.bias": r(FFN),
              p + "mlp.dense_4h_to_h.weight": r(D, FFN), p + "mlp.dense_4h_to_h.bias": r(D)}
    return w | {"encoder.final_layernorm.weight": 1 + r(D), "encoder.final_layernorm.bias": r(D)}


def qkv_axes(version: float) -> tuple[tuple[int, int, int], int, int]:
    """How `version` lays out the fused QKV rows: the shape, the heads' axis and q|k|v's axis."""
    if version < 1:
        return (3, -1, HD), 1, 0  # [3, heads, hd]
    if version < 2:
        return (-1, HD, 3), 0, 2  # [heads, hd, 3]
    return (-1, 3, HD), 0, 1  # [heads, 3, hd]


def tanh_gelu(x):  # Megatron's fused bias_gelu / openai_gelu
    return 0.5 * x * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def megatron_forward(w: dict, version: float, gelu, ids, output_layer=None) -> np.ndarray:
    """Megatron's GPT-2 forward from its own tensors: logits over the padded vocab."""
    ids = torch.tensor(ids)
    b, t = ids.shape
    ln = lambda x, p: F.layer_norm(x, (D,), w[p + ".weight"], w[p + ".bias"], 1e-5)  # noqa: E731
    x = w["embedding.word_embeddings.weight"][ids] + w["embedding.position_embeddings.weight"][:t]
    mask = torch.full((t, t), float("-inf")).triu(1)
    shape, _, qkv_axis = qkv_axes(version)
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        a = p + "self_attention."
        qkv = ln(x, p + "input_layernorm") @ w[a + "query_key_value.weight"].T \
            + w[a + "query_key_value.bias"]
        q, k, v = qkv.view(b, t, *shape).unbind(2 + qkv_axis)  # the version's row order
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [b, heads, t, hd]
        att = torch.softmax(q @ k.transpose(-1, -2) / HD**0.5 + mask, -1) @ v
        x = x + att.transpose(1, 2).reshape(b, t, D) @ w[a + "dense.weight"].T \
            + w[a + "dense.bias"]
        h = ln(x, p + "post_attention_layernorm") @ w[p + "mlp.dense_h_to_4h.weight"].T \
            + w[p + "mlp.dense_h_to_4h.bias"]
        x = x + gelu(h) @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]
    head = w["embedding.word_embeddings.weight"] if output_layer is None else output_layer
    return (ln(x, "encoder.final_layernorm") @ head.T).numpy()


def split_tp(w: dict, version: float, tp: int) -> list[dict]:
    """Megatron's tensor-parallel shards: each rank holds its heads' QKV rows in the version's
    order, column-parallel weights split on dim 0, row-parallel on dim 1."""
    shape, heads_axis, _ = qkv_axes(version)
    ranks = [{} for _ in range(tp)]
    for k, v in w.items():
        if "query_key_value" in k:
            parts = [x.reshape(-1, *v.shape[1:])
                     for x in v.reshape(*shape, *v.shape[1:]).chunk(tp, dim=heads_axis)]
        elif k.endswith(("dense_h_to_4h.weight", "dense_h_to_4h.bias", "word_embeddings.weight",
                         "word_embeddings_for_head.weight",
                         "output_layer.weight")):
            parts = v.chunk(tp, dim=0)
        elif k.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
            parts = v.chunk(tp, dim=1)
        else:
            parts = [v] * tp
        for rank, part in zip(ranks, parts, strict=True):
            rank[k] = part.clone()
    return ranks


def split_pp(w: dict, pp: int) -> list[dict]:
    """Pipeline stages: consecutive layers, numbered from 0 in each stage; the embedding on the
    first stage, the final norm (and a copy of the tied head) on the last."""
    per = LAYERS // pp
    stages = [{} for _ in range(pp)]
    for k, v in w.items():
        if ".layers." in k:
            i = int(k.split(".layers.")[1].split(".")[0])
            stage, local = divmod(i, per)
            stages[stage][k.replace(f".layers.{i}.", f".layers.{local}.")] = v
        elif k.startswith("embedding."):
            stages[0][k] = v
        else:
            stages[-1][k] = v
    if pp > 1:
        stages[-1]["word_embeddings_for_head.weight"] = w["embedding.word_embeddings.weight"]
    return stages


CORE_NAMES = {  # legacy -> Megatron-Core (Transformer Engine layers: layer norms fused)
    "embedding.": "embedding.", "encoder.final_layernorm": "decoder.final_layernorm",
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "post_attention_layernorm.": "mlp.linear_fc1.layer_norm_",
    "mlp.dense_h_to_4h": "mlp.linear_fc1", "mlp.dense_4h_to_h": "mlp.linear_fc2",
    "encoder.layers": "decoder.layers", "word_embeddings_for_head": "output_layer",
}
OLD_NAMES = {"encoder.": "transformer.", "self_attention.": "attention."}  # Megatron of 2019-20
TE_NAMES = {  # legacy Megatron built on Transformer Engine's TransformerLayer
    "input_layernorm.": "self_attention.layernorm_qkv.layer_norm_",
    "self_attention.query_key_value.": "self_attention.layernorm_qkv.",
    "self_attention.dense.": "self_attention.proj.",
    "post_attention_layernorm.": "layernorm_mlp.layer_norm_",
    "mlp.dense_h_to_4h.": "layernorm_mlp.fc1_", "mlp.dense_4h_to_h.": "layernorm_mlp.fc2_",
    "final_layernorm": "final_norm",
}


def rename(w: dict, names: dict) -> dict:
    out = {}
    for k, v in w.items():
        for a, b in names.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def megatron_args(tp: int = 1, pp: int = 1, **overrides) -> argparse.Namespace:
    return argparse.Namespace(**{
        "num_layers": LAYERS, "hidden_size": D, "num_attention_heads": HEADS,
        "max_position_embeddings": POSITIONS, "ffn_hidden_size": FFN, "layernorm_epsilon": 1e-5,
        "padded_vocab_size": PADDED, "make_vocab_size_divisible_by": 128,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "openai_gelu": False, "bias_gelu_fusion": False, "onnx_safe": None,
        "params_dtype": torch.float32, "fp16": False, "seq_length": POSITIONS, **overrides})


def save_megatron(root: Path, w: dict, version: float, *, tp: int = 1, pp: int = 1,
                  args: argparse.Namespace | None | bool = True, names: str = "legacy",
                  iteration: str = "iter_0000100", legacy_pickle: bool = False) -> Path:
    """Write `w` as Megatron saves it: <root>/<iteration>/mp_rank_XX[_YYY]/model_optim_rng.pt
    and latest_checkpointed_iteration.txt."""
    if args is True:
        args = megatron_args(tp, pp)
    for p, stage in enumerate(split_pp(w, pp)):
        for t, shard in enumerate(split_tp(stage, version, tp)):
            if names == "core":
                model = rename(shard, CORE_NAMES)
            else:
                shard = rename(shard, {"old": OLD_NAMES, "te": TE_NAMES}.get(names, {}))
                body = {k: v for k, v in shard.items() if not k.startswith("embedding.")}
                model = {"language_model": {
                    "embedding": {k.split(".")[1]: {"weight": v} for k, v in shard.items()
                                  if k.startswith("embedding.")},
                    **{"transformer" if names == "old" else "encoder":
                       {k.split(".", 1)[1]: v for k, v in body.items()
                        if k.startswith(("encoder.", "transformer."))}}}}
                if "word_embeddings_for_head.weight" in shard:
                    model["word_embeddings_for_head"] = {
                        "weight": shard["word_embeddings_for_head.weight"]}
            ckpt = {"model": model, "iteration": 100, "rng_state": [{
                "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]}
            if args:
                ckpt["args"] = args
            if version:
                ckpt["checkpoint_version"] = version
            rank = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            (root / iteration / rank).mkdir(parents=True, exist_ok=True)
            torch.save(ckpt, root / iteration / rank / "model_optim_rng.pt",
                       _use_new_zipfile_serialization=not legacy_pickle)
    (root / megatron_files.TRACKER).write_text(iteration.removeprefix("iter_").lstrip("0") or "0")
    if iteration == "release":
        (root / megatron_files.TRACKER).write_text("release")
    return root


# --- our side ---------------------------------------------------------------------------------

def ours(src, **options):
    """Our logits for IDS from `src`, converted in memory through the Megatron conversion."""
    conversion = megatron.conversion(Path(src), **options)
    model = trees.with_weights(models.abstract(conversion.config), conversion.weights())
    return np.asarray(mistral_jax.forward(model, IDS)), conversion


@pytest.fixture(scope="module")
def weights():
    return megatron_weights()


@pytest.mark.parametrize("version", [0, 1.0, 2.0, 3.0])
def test_every_version_and_tensor_parallel_split_gives_megatrons_logits(
        weights, version, tmp_path):
    expected = megatron_forward(weights, version, F.gelu, IDS)
    logits = {}
    for tp in (1, 2, 4):
        src = save_megatron(tmp_path / f"tp{tp}", weights, version, tp=tp)
        logits[tp], conversion = ours(src)
        assert conversion.config.activation_function == "gelu"  # args: neither tanh flag
        assert conversion.config.vocab_size == PADDED and conversion.tokenizer is None
    assert np.abs(logits[1] - expected).max() <= 1e-4
    for tp in (2, 4):
        np.testing.assert_allclose(logits[tp], logits[1], atol=1e-6, rtol=0)


def test_full_conversion_of_pipeline_and_tensor_shards_loads(weights, tmp_path):
    """TP 2 x pipeline 2, through the command line into a checkpoint that mistral_jax loads."""
    src = save_megatron(tmp_path / "src", weights, 3.0, tp=2, pp=2)
    assert sorted(p.name for p in (src / "iter_0000100").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert from_torch.main([str(src), str(tmp_path / "ckpt"), "--no-progress"]) == 0
    model = mistral_jax.load(tmp_path / "ckpt")
    expected = megatron_forward(weights, 3.0, F.gelu, IDS)
    assert np.abs(np.asarray(mistral_jax.forward(model, IDS)) - expected).max() <= 1e-4
    assert model.config.tie_word_embeddings and model.config.n_layer == LAYERS


@pytest.mark.parametrize("legacy_pickle", [True, False], ids=["torch<1.6-pickle", "zip-pickle"])
def test_ngc_zip_without_args(weights, legacy_pickle, tmp_path, monkeypatch):
    """NVIDIA's release: a zip of release/mp_rank_00/model_optim_rng.pt (2019: torch's pre-1.6
    pickle format), version 0, 2019 names, no args (so the heads come from a flag) and
    Megatron's tanh GELU of that time. The member is extracted, mapped, and removed at once."""
    release = save_megatron(tmp_path / "unzipped", weights, 0, args=None, names="old",
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
    expected = megatron_forward(weights, 0, tanh_gelu, IDS)
    assert np.abs(logits - expected).max() <= 1e-4
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    out = from_torch.convert(src, tmp_path / "ckpt", num_attention_heads=HEADS)
    assert not list((tmp_path / "tmp").iterdir())  # the member was extracted, then removed
    np.testing.assert_allclose(
        np.asarray(mistral_jax.forward(mistral_jax.load(out), IDS)), logits, atol=1e-6)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("names", ["core", "te"])
def test_megatron_core_and_transformer_engine_names(weights, names, pp, tmp_path):
    """Megatron-Core: decoder.layers.N.self_attention.linear_qkv (layer norm fused in),
    linear_proj, mlp.linear_fc1/2, and on a pipeline's last stage the tied head's synced copy,
    output_layer. Transformer Engine layers: layernorm_qkv, proj, layernorm_mlp.fc1_weight..."""
    src = save_megatron(tmp_path / "src", weights, 3.0, tp=2, pp=pp, names=names)
    logits, conversion = ours(src)
    assert conversion.config.tie_word_embeddings
    assert np.abs(logits - megatron_forward(weights, 3.0, F.gelu, IDS)).max() <= 1e-4


def test_untied_output_layer(weights, tmp_path):
    head = torch.randn(PADDED, D) * 0.2
    w = weights | {"output_layer.weight": head}
    src = tmp_path / "src"
    args = megatron_args(2, untie_embeddings_and_output_weights=True)
    save_megatron(src, w, 3.0, tp=2, args=args, names="core")
    logits, conversion = ours(src)
    assert not conversion.config.tie_word_embeddings
    expected = megatron_forward(weights, 3.0, F.gelu, IDS, output_layer=head)
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.parametrize("flags, activation", [
    ({"openai_gelu": True}, "gelu_fast"), ({"bias_gelu_fusion": True}, "gelu_fast"),
    ({"openai_gelu": True, "bias_gelu_fusion": True}, "gelu_fast"), ({}, "gelu")])
def test_activation_from_args(weights, flags, activation, tmp_path):
    src = save_megatron(tmp_path, weights, 3.0, args=megatron_args(**flags))
    logits, conversion = ours(src)
    assert conversion.config.activation_function == activation
    gelu = tanh_gelu if activation == "gelu_fast" else F.gelu
    assert np.abs(logits - megatron_forward(weights, 3.0, gelu, IDS)).max() <= 1e-4


def test_sizes_from_a_config_file_and_flags(weights, tmp_path):
    src = save_megatron(tmp_path / "src", weights, 2.0, args=None)
    (tmp_path / "sizes.json").write_text(json.dumps({"num_attention_heads": HEADS,
                                                     "bias_gelu_fusion": False}))
    logits, conversion = ours(src, megatron_config=str(tmp_path / "sizes.json"))
    assert conversion.config.activation_function == "gelu"
    assert np.abs(logits - megatron_forward(weights, 2.0, F.gelu, IDS)).max() <= 1e-4
    _, conversion = ours(src, num_attention_heads=HEADS, activation="gelu")
    c = conversion.config
    assert (c.n_layer, c.n_embd, c.n_positions, c.n_inner, c.n_head) == (
        LAYERS, D, POSITIONS, FFN, HEADS)


def test_vocab_and_merges_trim_the_padded_vocab(weights, tmp_path):
    texts = ["Megatron pads the vocabulary to a multiple of 128 times the TP size.",
             "The padding rows are never produced by the tokenizer."] * 3
    byte_level_bpe(texts, 300, ["<|endoftext|>"]).model.save(str(tmp_path))
    src = save_megatron(tmp_path / "src", weights, 1.0, tp=4)
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
    expected = megatron_forward(weights, 1.0, F.gelu, IDS)[..., :vocab]
    assert np.abs(np.asarray(mistral_jax.forward(model, IDS)) - expected).max() <= 1e-4


def test_any_path_into_the_checkpoint(weights, tmp_path):
    src = save_megatron(tmp_path / "src", weights, 2.0, tp=2)
    reference, _ = ours(src)
    iteration = src / "iter_0000100"
    for path in (iteration, iteration / "mp_rank_01", iteration / "mp_rank_00" /
                 "model_optim_rng.pt"):
        np.testing.assert_array_equal(ours(path)[0], reference)


# --- bad input --------------------------------------------------------------------------------

def fails(src, out: Path, *flags, match: str) -> str:
    """The command line refuses `src` with exit 1 and a message matching `match`; no OUT."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert from_torch.main([str(src), str(out), "--no-progress", *flags]) == 1
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    message = err.getvalue()
    assert re.search(match, message), message
    return message


def test_truncated_file(weights, tmp_path):
    src = save_megatron(tmp_path / "src", weights, 3.0, tp=2)
    shard = src / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt"
    shard.write_bytes(shard.read_bytes()[:5000])
    fails(src, tmp_path / "out", match=f"{shard}: cannot read as a torch checkpoint")
    (tmp_path / "x.pt").write_bytes(b"not a pickle")
    fails(tmp_path / "x.pt", tmp_path / "out", match="x.pt: cannot read as a torch checkpoint")


def test_directory_without_a_checkpoint(tmp_path):
    (tmp_path / "empty" / "iter_0000100").mkdir(parents=True)
    (tmp_path / "empty" / megatron_files.TRACKER).write_text("100")
    with pytest.raises(ConversionError, match="no Megatron checkpoint"):
        megatron.conversion(tmp_path / "empty")
    fails(tmp_path / "empty", tmp_path / "out", match="megatron: a Megatron-LM checkpoint")
    (tmp_path / "empty" / "iter_0000100" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(ConversionError, match="torch_dist .* --ckpt-convert-format torch"):
        megatron.conversion(tmp_path / "empty")


def test_the_tracker_chooses_among_iterations(weights, tmp_path):
    later = megatron_weights(seed=1)
    src = save_megatron(tmp_path, weights, 3.0, iteration="iter_0000100")
    save_megatron(tmp_path, later, 3.0, iteration="iter_0000200")  # the tracker now says 200
    expected = megatron_forward(later, 3.0, F.gelu, IDS)
    assert np.abs(ours(src)[0] - expected).max() <= 1e-4
    (tmp_path / megatron_files.TRACKER).write_text("300")
    with pytest.raises(ConversionError, match="names '300', but iter_0000300 holds no"):
        megatron.conversion(src)


def test_mismatched_shards(weights, tmp_path):
    a = save_megatron(tmp_path / "a", weights, 3.0, tp=2)
    b = save_megatron(tmp_path / "b", weights, 2.0, tp=2)
    rank1 = a / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt"
    rank1.write_bytes((b / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt").read_bytes())
    fails(a, tmp_path / "out", match=f"{rank1}: checkpoint_version 2.0, but .* has 3.0")
    c = save_megatron(tmp_path / "c", weights, 3.0, tp=4)  # a TP-4 shard among TP-2 ones
    rank1.write_bytes((c / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt").read_bytes())
    fails(a, tmp_path / "out", match=f"{rank1}: args.tensor_model_parallel_size = 4")
    (c / "iter_0000100" / "mp_rank_02").rename(tmp_path / "gone")
    fails(c, tmp_path / "out", match="shards mp_rank_02 are absent")
    d = save_megatron(tmp_path / "d", weights, 3.0, tp=2)  # same args, a tensor cut short
    rank1 = d / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt"
    ckpt = torch.load(rank1, weights_only=False)
    bias = ckpt["model"]["language_model"]["encoder"]
    bias["layers.1.mlp.dense_h_to_4h.bias"] = bias["layers.1.mlp.dense_h_to_4h.bias"][:-1]
    torch.save(ckpt, rank1)
    fails(d, tmp_path / "out", match=f"{rank1}: language_model.encoder.layers.1.mlp."
          r"dense_h_to_4h.bias is \(127,\), but \(128,\) in .*mp_rank_00")


def test_missing_tensors_are_all_listed(weights, tmp_path):
    w = {k: v for k, v in weights.items()
         if "layers.2.mlp.dense_4h_to_h.bias" not in k and "final_layernorm.bias" not in k}
    src = save_megatron(tmp_path / "src", w, 3.0)
    message = fails(src, tmp_path / "out", match="2 problem")
    assert "missing tensor language_model.encoder.layers.{i}.mlp.dense_4h_to_h.bias for " \
        "layers 2" in message and "missing tensor language_model.encoder.final_layernorm.bias" \
        in message


def test_missing_heads_without_args(weights, tmp_path):
    src = save_megatron(tmp_path / "src", weights, 0, args=None)
    fails(src, tmp_path / "out", match="--num-attention-heads")
    fails(src, tmp_path / "out", "--num-attention-heads", "5", match="n_embd=64 is not a "
          "multiple of n_head=5")


def test_not_a_gpt2(weights, tmp_path):
    src = save_megatron(tmp_path / "src", weights, 3.0, args=megatron_args(swiglu=True))
    fails(src, tmp_path / "out", match="args.swiglu = True")


# --- torch pickles that ask for more than weights ---------------------------------------------

class Payload:
    """Runs a shell command when unpickled by an unguarded torch.load / pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["pt", "legacy-pt", "ngc-zip"])
def test_malicious_pickle_is_refused_and_never_runs(weights, container, tmp_path):
    marker = tmp_path / "ran"
    ckpt = {"model": {"language_model": {"x": torch.zeros(2)}}, "args": Payload(marker)}
    pt = tmp_path / "model_optim_rng.pt"
    torch.save(ckpt, pt, _use_new_zipfile_serialization=container != "legacy-pt")
    src = pt
    if container == "ngc-zip":
        src = tmp_path / "release.zip"
        with zipfile.ZipFile(src, "w") as zf:
            zf.write(pt, "release/mp_rank_00/model_optim_rng.pt")
    global_name = f"{os.system.__module__}.system"  # posix.system
    with pytest.raises(ConversionError, match=f"refused to load.*{global_name}.*nothing in the "
                       "file was run") as e:
        megatron.conversion(src, num_attention_heads=HEADS)
    assert str(src) in str(e.value)
    fails(src, tmp_path / "out", match=global_name)
    assert not marker.exists()
    torch.load(pt, weights_only=False)  # the same file, loaded unguarded, does run it
    assert marker.exists()


@pytest.mark.parametrize("layout", ["hf-pytorch_model.bin", "mistral-consolidated.00.pth"])
def test_pickles_of_the_other_formats_are_refused_too(layout, tmp_path):
    """README's promise for every torch pickle, not only Megatron's: an HF folder's
    pytorch_model.bin and a Mistral release's consolidated.00.pth that ask to run code."""
    marker, src = tmp_path / "ran", tmp_path / "src"
    src.mkdir()
    bad = {"model.embed_tokens.weight": torch.zeros(2), "extra": Payload(marker)}
    if layout.startswith("hf"):
        (src / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
        torch.save(bad, src / "pytorch_model.bin")
    else:
        (src / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2,
                                                     "n_kv_heads": 1, "vocab_size": 8,
                                                     "norm_eps": 1e-5, "hidden_dim": 16}))
        torch.save(bad, src / "consolidated.00.pth")
    fails(src, tmp_path / "out", match=f"refused to load.*{os.system.__module__}.system")
    assert not marker.exists()


def test_megatron_enums_and_rng_state_load(tmp_path, monkeypatch):
    """args may hold Megatron enums (ModelType...): read into a stand-in, megatron not imported."""
    import enum

    module = types.ModuleType("megatron.core.enums")

    class ModelType(enum.Enum):
        encoder_or_decoder = 1

    ModelType.__module__, ModelType.__qualname__ = module.__name__, "ModelType"
    module.ModelType = ModelType
    for name in ("megatron", "megatron.core", "megatron.core.enums"):
        monkeypatch.setitem(sys.modules, name, module)
    args = megatron_args(model_type=ModelType.encoder_or_decoder)
    torch.save({"args": args, "rng_state": [{"np_rng_state": np.random.get_state()}],
                "model": {}}, tmp_path / "a.pt")
    monkeypatch.delitem(sys.modules, "megatron.core.enums")
    loaded = load_torch(tmp_path / "a.pt")
    assert isinstance(loaded["args"].model_type, MegatronEnum)
    assert loaded["args"].model_type.value == 1 and loaded["args"].params_dtype == torch.float32
    assert loaded["rng_state"][0]["np_rng_state"][1].dtype == np.uint32
