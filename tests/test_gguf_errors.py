"""GGUF files the converter refuses, each with a message that names the file and what is wrong,
leaving nothing at OUT: truncated files, other architectures and settings, unsupported tensor
types, files that are not GGUF, and the gguf package missing."""

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from convert import from_torch
from convert.formats import gguf as gguf_format
from convert.parity import random_hf_model
from convert.read.errors import ConversionError
from tests.gguf_reference import finish, gguf_tensors, new_writer, write_gguf


@pytest.fixture(scope="module")
def llama():
    return random_hf_model("llama", tie_word_embeddings=True)


def fails(capsys, src: Path, out: Path, *needles: str) -> str:
    """Converting `src` exits 1 with every needle in the message and leaves nothing at `out`."""
    assert from_torch.main([str(src), str(out)]) == 1
    err = capsys.readouterr().err
    for needle in (str(src), *needles):
        assert needle in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err


def test_truncated_files(llama, tmp_path, capsys):
    whole = write_gguf(tmp_path / "whole.gguf", llama, Q.Q8_0).read_bytes()
    for cut in (len(whole) - 100, len(whole) // 2, 60):
        src = tmp_path / f"cut{cut}.gguf"
        src.write_bytes(whole[:cut])
        fails(capsys, src, tmp_path / "out", "truncated")
    (tmp_path / "short.gguf").write_bytes(whole[:-100])  # inside the last tensor
    with pytest.raises(ConversionError, match=r"tensor blk\.1\.ffn_norm\.weight ends at byte"):
        gguf_format.conversion(tmp_path / "short.gguf")


def test_refused_architectures_and_settings(llama, tmp_path, capsys):
    fails(capsys, write_gguf(tmp_path / "qwen.gguf", llama, Q.F16, arch="qwen2"), tmp_path / "o",
          "general.architecture", "qwen2")
    fails(capsys, write_gguf(tmp_path / "yarn.gguf", llama, Q.F16, rope__scaling__type="yarn"),
          tmp_path / "o", "llama.rope.scaling.type", "yarn")
    linear = write_gguf(tmp_path / "linear.gguf", llama, Q.F16, rope__scaling__type="linear",
                        rope__scaling__factor=2.0)
    fails(capsys, linear, tmp_path / "o", "llama.rope.scaling.factor", "2.0")
    fails(capsys, write_gguf(tmp_path / "moe.gguf", llama, Q.F16, expert_count=8),
          tmp_path / "o", "llama.expert_count")
    fails(capsys, write_gguf(tmp_path / "gone.gguf", llama, Q.F16, skip=["blk.1.ffn_up.weight"]),
          tmp_path / "o", "blk.{i}.ffn_up.weight", "layers 1")


def test_unsupported_tensor_type(llama, tmp_path, capsys):
    w = new_writer(tmp_path / "iq.gguf", llama.config)
    for key, value in gguf_tensors(llama).items():
        if key == "blk.0.ffn_up.weight":  # IQ4_NL: 18 bytes per block of 32
            rows, cols = value.shape
            w.add_tensor(key, np.zeros((rows, cols // 32 * 18), np.uint8), raw_dtype=Q.IQ4_NL)
        else:
            w.add_tensor(key, value)
    finish(w)
    fails(capsys, tmp_path / "iq.gguf", tmp_path / "o", "blk.0.ffn_up.weight (IQ4_NL)")


def test_not_a_gguf_file(tmp_path, capsys):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(8))
    fails(capsys, tmp_path / "junk.gguf", tmp_path / "o", "GGUF")
    (tmp_path / "notes.txt").write_text("hello")
    fails(capsys, tmp_path / "notes.txt", tmp_path / "o", "GGUF file")


def test_without_the_gguf_package(llama, tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", llama, Q.F16)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    assert from_torch.detect(path) == "gguf"
    with pytest.raises(ConversionError, match=r"pip install 'mistral_jax\[gguf\]'"):
        gguf_format.conversion(path)
