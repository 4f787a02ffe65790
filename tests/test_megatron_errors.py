"""Megatron-LM checkpoints the converter refuses, each with a message that names the file and
the problem, writing nothing; and torch pickles that ask for more than weights, refused before
anything in them runs (Megatron's, HF's pytorch_model.bin, Mistral's consolidated.pth)."""

import json
import os
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convert.formats import megatron
from convert.read import megatron_files
from convert.read.errors import ConversionError
from convert.read.pickles import MegatronEnum, load_torch
from tests.megatron_reference import (
    HEADS,
    IDS,
    fails,
    megatron_args,
    megatron_forward,
    megatron_weights,
    ours,
    save_megatron,
)

# --- bad input --------------------------------------------------------------------------------

def test_truncated_file(megatron_tensors, tmp_path):
    src = save_megatron(tmp_path / "src", megatron_tensors, 3.0, tp=2)
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


def test_the_tracker_chooses_among_iterations(megatron_tensors, tmp_path):
    later = megatron_weights(seed=1)
    src = save_megatron(tmp_path, megatron_tensors, 3.0, iteration="iter_0000100")
    save_megatron(tmp_path, later, 3.0, iteration="iter_0000200")  # the tracker now says 200
    expected = megatron_forward(later, 3.0, F.gelu, IDS)
    assert np.abs(ours(src)[0] - expected).max() <= 1e-4
    (tmp_path / megatron_files.TRACKER).write_text("300")
    with pytest.raises(ConversionError, match="names '300', but iter_0000300 holds no"):
        megatron.conversion(src)


def test_mismatched_shards(megatron_tensors, tmp_path):
    a = save_megatron(tmp_path / "a", megatron_tensors, 3.0, tp=2)
    b = save_megatron(tmp_path / "b", megatron_tensors, 2.0, tp=2)
    rank1 = a / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt"
    rank1.write_bytes((b / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt").read_bytes())
    fails(a, tmp_path / "out", match=f"{rank1}: checkpoint_version 2.0, but .* has 3.0")
    c = save_megatron(tmp_path / "c", megatron_tensors, 3.0, tp=4)  # a TP-4 shard among TP-2 ones
    rank1.write_bytes((c / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt").read_bytes())
    fails(a, tmp_path / "out", match=f"{rank1}: args.tensor_model_parallel_size = 4")
    (c / "iter_0000100" / "mp_rank_02").rename(tmp_path / "gone")
    fails(c, tmp_path / "out", match="shards mp_rank_02 are absent")
    d = save_megatron(tmp_path / "d", megatron_tensors, 3.0, tp=2)  # same args, a tensor cut short
    rank1 = d / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt"
    ckpt = torch.load(rank1, weights_only=False)
    bias = ckpt["model"]["language_model"]["encoder"]
    bias["layers.1.mlp.dense_h_to_4h.bias"] = bias["layers.1.mlp.dense_h_to_4h.bias"][:-1]
    torch.save(ckpt, rank1)
    fails(d, tmp_path / "out", match=f"{rank1}: language_model.encoder.layers.1.mlp."
          r"dense_h_to_4h.bias is \(127,\), but \(128,\) in .*mp_rank_00")


def test_missing_tensors_are_all_listed(megatron_tensors, tmp_path):
    w = {k: v for k, v in megatron_tensors.items()
         if "layers.2.mlp.dense_4h_to_h.bias" not in k and "final_layernorm.bias" not in k}
    src = save_megatron(tmp_path / "src", w, 3.0)
    message = fails(src, tmp_path / "out", match="2 problem")
    assert "missing tensor language_model.encoder.layers.{i}.mlp.dense_4h_to_h.bias for " \
        "layers 2" in message and "missing tensor language_model.encoder.final_layernorm.bias" \
        in message


def test_missing_heads_without_args(megatron_tensors, tmp_path):
    src = save_megatron(tmp_path / "src", megatron_tensors, 0, args=None)
    fails(src, tmp_path / "out", match="--num-attention-heads")
    fails(src, tmp_path / "out", "--num-attention-heads", "5", match="n_embd=64 is not a "
          "multiple of n_head=5")


def test_not_a_gpt2(megatron_tensors, tmp_path):
    src = save_megatron(tmp_path / "src", megatron_tensors, 3.0, args=megatron_args(swiglu=True))
    fails(src, tmp_path / "out", match="args.swiglu = True")


# --- torch pickles that ask for more than weights -------------------------------------------------

class Payload:
    """Runs a shell command when unpickled by an unguarded torch.load / pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["pt", "legacy-pt", "ngc-zip"])
def test_malicious_pickle_is_refused_and_never_runs(megatron_tensors, container, tmp_path):
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
