"""from_torch streams: one tensor at a time into the checkpoint, written atomically; Hub repo ids
resolve through the huggingface_hub cache; unreadable safetensors files are named."""

import ml_dtypes
import numpy as np
import pytest
import torch

import mistral_jax
from convert import from_torch
from convert.formats import hf
from convert.read.sources import TensorSource
from mistral_jax.base import trees
from mistral_jax.io.checkpoint import CheckpointError, StreamingWriter
from mistral_jax.model import registry as models
from tests.reference import hf_model, torch_logits

IDS = np.random.default_rng(1).integers(0, 96, (2, 10))


def _leftovers(tmp_path, name="out"):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}.tmp"))


@pytest.mark.parametrize("kind", ["mistral", "gpt2"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_streamed_checkpoint_holds_the_in_memory_conversion(kind, dtype, tmp_path):
    hf_model(kind, tmp_path / "hf")
    out = from_torch.convert(tmp_path / "hf", tmp_path / "out", dtype=dtype)
    params = mistral_jax.load(out)
    np_dtype = ml_dtypes.bfloat16 if dtype else None
    _, expected = hf.convert(tmp_path / "hf", np_dtype)
    got = trees.flatten(trees.weights(params))
    expected = trees.flatten(expected)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert np.array_equal(np.asarray(got[name]), value), name
    assert _leftovers(tmp_path) == []


def test_streamed_checkpoint_restores_sharded(tmp_path):
    model = hf_model("mistral", tmp_path / "hf")
    from_torch.convert(tmp_path / "hf", tmp_path / "out")
    mesh = mistral_jax.make_mesh("2x4")
    params = mistral_jax.load(tmp_path / "out", mesh=mesh)
    assert params.layers.q[...].sharding.mesh.shape == mesh.shape
    got = np.asarray(mistral_jax.forward(params, IDS))
    assert np.max(np.abs(got - torch_logits(model, IDS))) <= 1e-4


def test_interrupted_conversion_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    hf_model("mistral", tmp_path / "hf")
    reads = []

    def get(self, key, original=TensorSource.get):
        reads.append(key)
        if len(reads) == 5:
            raise KeyboardInterrupt
        return original(self, key)

    monkeypatch.setattr(TensorSource, "get", get)
    with pytest.raises(KeyboardInterrupt):
        from_torch.convert(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []

    monkeypatch.undo()
    from_torch.convert(tmp_path / "hf", tmp_path / "out")
    before = np.asarray(mistral_jax.forward(mistral_jax.load(tmp_path / "out"), IDS))
    reads.clear()
    monkeypatch.setattr(TensorSource, "get", get)
    with pytest.raises(KeyboardInterrupt):
        from_torch.convert(tmp_path / "hf", tmp_path / "out", overwrite=True)
    after = np.asarray(mistral_jax.forward(mistral_jax.load(tmp_path / "out"), IDS))
    assert np.array_equal(before, after) and _leftovers(tmp_path) == []


def test_writer_refuses_a_checkpoint_with_weights_never_written(tmp_path):
    config = mistral_jax.preset("mistral-tiny")
    shapes = {k: v.shape for k, v in
              trees.flatten(trees.weights(models.abstract(config))).items()}
    with pytest.raises(CheckpointError, match=r"never written: .*layers\.q.*norm"):
        with StreamingWriter(config, tmp_path / "out") as writer:
            writer.put("embed", np.zeros(shapes["embed"], np.float32))
            writer.put("layers.q", np.zeros(shapes["layers.q"][1:], np.float32), layer=0)
    with pytest.raises(CheckpointError, match=r"layers\.k: shape \(3,\)"):
        with StreamingWriter(config, tmp_path / "out") as writer:
            writer.put("layers.k", np.zeros(3, np.float32), layer=0)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def _hub_cache(tmp_path, monkeypatch, model_dir, repo="acme/tiny-mistral"):
    """A huggingface_hub cache holding `model_dir`'s files as repo `repo`, used offline."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_repo_id_resolves_from_the_cache_offline(tmp_path, monkeypatch, capsys):
    model = hf_model("llama", tmp_path / "hf")
    _hub_cache(tmp_path, monkeypatch, tmp_path / "hf")
    capsys.readouterr()
    assert from_torch.main(["acme/tiny-mistral", str(tmp_path / "out")]) == 0
    got = np.asarray(mistral_jax.forward(mistral_jax.load(tmp_path / "out"), IDS))
    assert np.max(np.abs(got - torch_logits(model, IDS))) <= 1e-4

    capsys.readouterr()
    assert from_torch.main(["acme/not-cached", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err.strip()
    assert "acme/not-cached" in err and "HF_HUB_OFFLINE" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "other").exists()
    assert from_torch.main(["no/such/path", str(tmp_path / "other")]) == 1
    assert "no/such/path does not exist" in capsys.readouterr().err


def test_a_gguf_file_of_a_hub_repo_resolves_from_the_cache(tmp_path, monkeypatch):
    from gguf import GGMLQuantizationType

    from tests.gguf_reference import write_gguf

    model = hf_model("llama", tie_word_embeddings=True)
    (tmp_path / "repo").mkdir()
    write_gguf(tmp_path / "repo" / "tiny-F32.gguf", model, GGMLQuantizationType.F32)
    _hub_cache(tmp_path, monkeypatch, tmp_path / "repo", repo="acme/tiny-GGUF")
    assert from_torch.main(["acme/tiny-GGUF/tiny-F32.gguf", str(tmp_path / "out")]) == 0
    got = np.asarray(mistral_jax.forward(mistral_jax.load(tmp_path / "out"), IDS))
    assert np.max(np.abs(got - torch_logits(model, IDS))) <= 1e-4


def test_truncated_or_corrupt_safetensors_are_named(tmp_path, capsys):
    hf_model("mistral", tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    assert from_torch.main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors: tensor" in err and "truncated" in err
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert from_torch.main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    assert "not a safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_released_torch_tensors_read_back_intact(tmp_path):
    """Pages of a tensor mapped from a torch file are handed back after use; the file-backed
    data stays correct, for it and for its neighbours."""
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": torch.tensor(rng.standard_normal((700, 1000), np.float32))
               for i in range(3)}
    tensors["small"] = torch.arange(10.0)
    torch.save(tensors, tmp_path / "w.pth")
    source = TensorSource.from_files([tmp_path / "w.pth"])
    for key in ("t0", "t1", "small", "t2", "t0"):
        assert np.array_equal(source.get(key), tensors[key].numpy()), key
        source.release(key)


def test_bfloat16_safetensors_read_without_torch(tmp_path):
    values = torch.randn(5, 7).to(torch.bfloat16)
    from safetensors.torch import save_file

    save_file({"w": values, "b": torch.arange(3, dtype=torch.int64)}, tmp_path / "x.safetensors")
    source = TensorSource.from_files([tmp_path / "x.safetensors"])
    got = source.get("w")
    assert got.dtype == ml_dtypes.bfloat16
    assert np.array_equal(got.astype(np.float32), values.float().numpy())
    assert source.get("b").tolist() == [0, 1, 2]


def test_progress_bar_is_drawn_on_request(tmp_path, capsys, monkeypatch):
    hf_model("gpt2", tmp_path / "hf")
    import tqdm

    drawn = []
    monkeypatch.setattr(tqdm, "tqdm", lambda items, **kw: drawn.append(len(items)) or items)
    from_torch.convert(tmp_path / "hf", tmp_path / "out", progress=True)
    n_layers = mistral_jax.load(tmp_path / "out").config.n_layers
    assert drawn == [4 + 12 * n_layers]  # wte, wpe, ln_f x2 and 12 a layer (the head is tied)


def test_legacy_torch_pickles_read_into_memory_are_not_released(tmp_path):
    """A pre-zip torch file cannot be mapped; releasing its tensors must not touch them."""
    values = {f"t{i}": torch.full((600, 1000), float(i)) for i in range(3)}
    torch.save(values, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    source = TensorSource.from_files([tmp_path / "old.bin"])
    for key in ("t0", "t1", "t2"):
        source.release(key)
    for key in ("t0", "t1", "t2"):
        assert np.array_equal(source.get(key), values[key].numpy()), key
