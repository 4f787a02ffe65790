"""HF folder -> our checkpoint -> load gives the same logits; bad input gets a clear error."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mistral_jax
from convert import from_torch
from convert.read.errors import ConversionError
from tests.reference import hf_model, torch_logits

IDS = np.random.default_rng(0).integers(0, 96, (2, 12))


@pytest.mark.parametrize("kind", ["mistral", "gpt2", "llama"])
@pytest.mark.parametrize("storage", ["safetensors", "sharded", "bin"])
def test_round_trip_hf_folder_to_checkpoint(kind, storage, tmp_path):
    src = tmp_path / "hf"
    model = hf_model(kind, safe_serialization=storage != "bin")
    if storage == "sharded":
        model.save_pretrained(src, max_shard_size="20KB")
        assert (src / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(src, safe_serialization=storage != "bin")
    assert from_torch.main([str(src), str(tmp_path / "ckpt")]) == 0
    params = mistral_jax.load(tmp_path / "ckpt")
    got = np.asarray(mistral_jax.forward(params, IDS))
    assert np.max(np.abs(got - torch_logits(model, IDS))) <= 1e-4
    # save -> load of our own checkpoint keeps every weight bit for bit
    mistral_jax.save(params, tmp_path / "again")
    again = mistral_jax.load(tmp_path / "again")
    assert np.array_equal(np.asarray(mistral_jax.forward(again, IDS)), got)
    assert again.config == params.config


def test_load_casts_to_dtype_and_grad_works_on_the_loaded_model(tmp_path):
    mistral_jax.save(mistral_jax.init(mistral_jax.preset("mistral-tiny")), tmp_path / "c")
    params = mistral_jax.load(tmp_path / "c", dtype=jnp.bfloat16)
    assert {x.dtype for x in __import__("jax").tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    import jax
    import optax

    params = mistral_jax.load(tmp_path / "c")
    grads = jax.grad(lambda p: mistral_jax.loss(p, IDS))(params)
    updated = optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, grads))
    assert float(mistral_jax.loss(updated, IDS)) < float(mistral_jax.loss(params, IDS))


def test_exported_config_loads_in_transformers(tmp_path):
    import transformers

    for name in ("mistral-tiny", "gpt2-tiny", "mistral-7b"):
        config = mistral_jax.preset(name)
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(mistral_jax.arch.configs.to_hf_dict(config)))
        theirs = transformers.AutoConfig.from_pretrained(path)
        assert mistral_jax.arch.configs.from_hf_dict(theirs.to_dict()) == config


# --- bad input -----------------------------------------------------------------------------------


def test_token_ids_outside_vocab_are_refused():
    params = mistral_jax.init(mistral_jax.preset("mistral-tiny"))
    with pytest.raises(ValueError, match="token id 128 is outside the vocabulary"):
        mistral_jax.forward(params, np.array([[1, 128]]))
    with pytest.raises(ValueError, match="token id -1"):
        mistral_jax.forward(params, np.array([[-1, 3]]))


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(tmp_path):
    src = tmp_path / "hf"
    hf_model("mistral", src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 32)
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError) as e:
        from_torch.convert(src, tmp_path / "out")
    message = str(e.value)
    for part in ("missing tensor model.layers.{i}.mlp.up_proj.weight for layers 1",
                 "missing tensor model.norm.weight", "unexpected tensor model.extra.weight",
                 "model.layers.0.self_attn.q_proj.weight: shape"):
        assert part in message
    assert not (tmp_path / "out").exists()


def test_config_that_does_not_match_the_weights(tmp_path, capsys):
    src = tmp_path / "hf"
    hf_model("gpt2", src)
    config = json.loads((src / "config.json").read_text())
    config["n_embd"] = 64
    (src / "config.json").write_text(json.dumps(config))
    assert from_torch.main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    lines = err[err.index("error: "):].splitlines()
    assert lines[0].startswith(f"error: {src / 'config.json'} says n_embd 64; the weights have 32")
    assert "    transformer.wte.weight: shape (96, 32) cannot give the config's (96, 64)" in lines
    assert not (tmp_path / "out").exists()


def test_checkpoint_config_that_does_not_match_its_weights(tmp_path):
    mistral_jax.save(mistral_jax.init(mistral_jax.preset("mistral-tiny")), tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(mistral_jax.CheckpointError, match=r"layers\.q: shape \(2, 32, 4, 8\)"):
        mistral_jax.load(tmp_path / "c")


def test_unknown_model_type_and_unsupported_options(tmp_path, capsys):
    src = tmp_path / "hf"
    hf_model("mistral", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    assert from_torch.main([str(src), str(tmp_path / "out")]) == 1
    assert "unknown model_type 'bert'" in capsys.readouterr().err
    with pytest.raises(mistral_jax.ConfigError, match="attention_bias"):
        mistral_jax.arch.configs.from_hf_dict({**config, "model_type": "llama",
                                               "attention_bias": True})


def test_not_a_checkpoint_and_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(mistral_jax.CheckpointError, match="is not a mistral_jax checkpoint"):
        mistral_jax.load(tmp_path / "empty")
    assert from_torch.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'}: an empty folder, not a checkpoint" in err
    assert "  hf: a Hugging Face model folder" in err
    assert from_torch.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_save_refuses_to_overwrite_and_leaves_no_partial_directory(tmp_path):
    params = mistral_jax.init(mistral_jax.preset("gpt2-tiny"))
    mistral_jax.save(params, tmp_path / "c")
    with pytest.raises(FileExistsError, match="already exists"):
        mistral_jax.save(params, tmp_path / "c")
    mistral_jax.save(params, tmp_path / "c", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    shutil.rmtree(tmp_path / "c" / "weights")
    with pytest.raises(mistral_jax.CheckpointError):
        mistral_jax.load(tmp_path / "c")


def test_tokenizer_travels_from_hf_folder_into_the_checkpoint(tmp_path):
    from tests.fetch import fetch_wheel_member

    sp_model = fetch_wheel_member("mistral-common", "mistral_common/data/tokenizer.model.v1")
    src = tmp_path / "hf"
    model = hf_model("mistral", src, vocab_size=32000)
    shutil.copy(sp_model, src / "tokenizer.model")
    assert from_torch.main([str(src), str(tmp_path / "ckpt")]) == 0
    params = mistral_jax.load(tmp_path / "ckpt")
    text = "My favourite condiment is ketchup 🍅"
    ids = params.tokenizer.encode(text)
    assert ids[0] == 1 and params.tokenizer.decode(ids) == text
    got = np.asarray(mistral_jax.forward(params, [ids]))  # jit with the tokenizer as static data
    assert np.max(np.abs(got - torch_logits(model, [ids]))) <= 1e-4
