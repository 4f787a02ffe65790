"""Mistral's original release format (params.json + consolidated.*) against transformers' model
with the same weights."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mistral_jax
from convert import from_torch
from convert.read.errors import ConversionError
from tests.reference import hf_model, layers_renamed, torch_logits

IDS = np.random.default_rng(0).integers(0, 96, (2, 14))


def original_release(model) -> tuple[dict, dict]:
    """The params.json and consolidated state dict Mistral publishes for this HF model."""
    c = model.config
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    layers = layers_renamed(sd, c, names, "layers.{i}.{name}.weight")
    out.update({k: v.contiguous() for k, v in layers.items()})
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "head_dim": c.head_dim,
              "hidden_dim": c.intermediate_size, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "norm_eps": c.rms_norm_eps,
              "vocab_size": c.vocab_size, "sliding_window": c.sliding_window,
              "rope_theta": 10000.0}
    return params, out


def split(sd: dict, shards: int) -> list[dict]:
    """Llama-style model-parallel shards: column-parallel on dim 0, row-parallel on dim 1."""
    row = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
    parts = [{} for _ in range(shards)]
    for k, v in sd.items():
        pieces = [v] * shards if v.ndim == 1 else torch.chunk(v, shards, dim=1 if k.endswith(row)
                                                               else 0)
        for p, piece in zip(parts, pieces, strict=True):
            p[k] = piece.contiguous()
    return parts


@pytest.mark.parametrize("layout", ["pth", "two-shards", "safetensors"])
def test_original_release_converts_to_transformers_logits(layout, tmp_path):
    model = hf_model("mistral")
    params, sd = original_release(model)
    src = tmp_path / "release"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(params))
    if layout == "pth":
        torch.save(sd, src / "consolidated.00.pth")
    elif layout == "two-shards":
        for i, part in enumerate(split(sd, 2)):
            torch.save(part, src / f"consolidated.{i:02d}.pth")
    else:
        save_file(sd, src / "consolidated.safetensors")
    assert from_torch.main([str(src), str(tmp_path / "ckpt")]) == 0
    params = mistral_jax.load(tmp_path / "ckpt")
    assert params.config.sliding_window == 4 and params.config.rope_theta == 10000.0
    got = np.asarray(mistral_jax.forward(params, IDS))
    assert np.max(np.abs(got - torch_logits(model, IDS))) <= 1e-4


def write_release(folder, params: dict, sd: dict) -> None:
    """params.json + one consolidated.00.pth in `folder`."""
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(sd, folder / "consolidated.00.pth")


def test_params_json_without_rope_theta_says_which_default(tmp_path, capsys):
    model = hf_model("mistral")
    params, sd = original_release(model)
    del params["rope_theta"]
    write_release(tmp_path, params, sd)
    assert from_torch.main([str(tmp_path), str(tmp_path / "ckpt"), "--format", "mistral"]) == 0
    assert "has no rope_theta; using 10000.0" in capsys.readouterr().err


def test_bad_release_folders(tmp_path, capsys):
    model = hf_model("mistral")
    params, sd = original_release(model)
    del params["hidden_dim"]
    del sd["layers.1.feed_forward.w3.weight"]
    write_release(tmp_path, params, sd)
    assert from_torch.main([str(tmp_path), str(tmp_path / "out")]) == 1
    assert "lacks 'hidden_dim'" in capsys.readouterr().err
    params["hidden_dim"] = 64
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConversionError, match=r"missing tensor layers\.\{i\}\.feed_forward\.w3"):
        from_torch.convert(tmp_path, tmp_path / "out")
    assert from_torch.main([str(tmp_path), str(tmp_path / "out"), "--format", "hf"]) == 1
    assert "is not in the 'hf' format" in capsys.readouterr().err


def test_params_json_that_disagrees_with_the_tensors_is_named(tmp_path, capsys):
    model = hf_model("mistral")
    params, sd = original_release(model)
    params["hidden_dim"] *= 2
    write_release(tmp_path, params, sd)
    assert from_torch.main([str(tmp_path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'params.json'} says intermediate_size 128; the weights have " \
        "64: fix it" in err
    for w in ("w1", "w2", "w3"):
        assert f"layers.{{i}}.feed_forward.{w}.weight" in err or f"feed_forward.{w}.weight" in err
    assert not (tmp_path / "out").exists()
