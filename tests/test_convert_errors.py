"""What the converters' command line prints for input it cannot convert: a first line that names
the file, what is wrong and what to do, then the tensors one a line; every line short, exit 1,
nothing written."""

import json

import pytest

from convert import from_torch
from tests.reference import hf_model

WIDTH = 120


def convert_fails(capsys, src: str, out: str = "out") -> list[str]:
    assert from_torch.main([src, out]) == 1
    lines = capsys.readouterr().err.splitlines()
    lines = lines[lines.index(next(x for x in lines if x.startswith("error: "))):]
    assert [x for x in lines if len(x) > WIDTH] == []
    return lines


@pytest.mark.parametrize("kind, field, theirs, config_class", [
    ("mistral", "hidden_size", 32, "MistralConfig"), ("gpt2", "n_embd", 32, "GPT2Config")])
def test_a_config_that_disagrees_with_the_weights(kind, field, theirs, config_class, tmp_path,
                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the paths as a user types them
    hf_model(kind, tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    assert config[field] == theirs
    config[field] = 128
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    lines = convert_fails(capsys, "src")
    assert lines[0] == (f"error: src/config.json says {field} 128; the weights have {theirs}: "
                        "fix it, or use these weights' own config")
    count = int(lines[1].split()[0])
    assert lines[1] == f"  {count} problem(s) converting to {config_class}:"
    assert count == len(lines) - 2 > 3
    assert all(x.startswith("    ") for x in lines[2:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT, no half of it


def test_a_config_with_fewer_layers_than_the_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hf_model("mistral", tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    layers, config["num_hidden_layers"] = config["num_hidden_layers"], 2
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    lines = convert_fails(capsys, "src")
    assert lines[0].startswith(f"error: src/config.json says num_hidden_layers 2; the weights "
                               f"have {layers}: ")
    assert layers == 3 and lines[2] == "    9 tensors of layer 2, past the config's 2 layers"


@pytest.mark.parametrize("files", [[], ["notes.txt"]])
def test_a_folder_without_a_checkpoint(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    for name in files:
        (tmp_path / "src" / name).write_text("hello")
    lines = convert_fails(capsys, "src")
    what = "a folder of 1 file(s) (notes.txt)" if files else "an empty folder"
    assert lines[0] == f"error: src: {what}, not a checkpoint this converter reads; give one of:"
    assert [x.split(":")[0].strip() for x in lines[1:]] == list(from_torch.FORMATS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
