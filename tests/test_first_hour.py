"""What a new user meets in their first hour: relative paths, outputs that appear whole or not at
all, meshes that fit the machine and the model, no silent wrong answers, and every mistake
answered in one line that says what to do."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import mistral_jax
from convert import from_torch, parity, to_torch
from mistral_jax.arch import configs
from mistral_jax.base import trees
from mistral_jax.cli import generate as generate_cli
from mistral_jax.io import files
from mistral_jax.model import registry
from mistral_jax.parallel import devices
from tests.reference import hf_model, text_model
from train import eval as eval_cli
from train import finetune
from train.input import default

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """(HF folder, our checkpoint) of a tiny Mistral with a BPE tokenizer and a chat template."""
    d = tmp_path_factory.mktemp("text")
    text_model(d / "hf")
    return d / "hf", from_torch.convert(d / "hf", d / "ckpt")


def user_env():
    """The environment of a user's shell: no XLA_FLAGS, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    return env


# --- paths as users type them, and directories written whole -----------------------------------


def test_relative_paths_everywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    theirs = hf_model("gpt2", Path("hf")).eval()
    assert from_torch.main(["hf", "ckpt"]) == 0
    model = mistral_jax.load("ckpt")
    mistral_jax.save(model, "copy")
    assert to_torch.main(["copy", "back"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained("back").eval()
    assert back.config.model_type == "gpt2"
    ids = torch.tensor(np.random.default_rng(0).integers(0, theirs.config.vocab_size, (1, 12)))
    with torch.no_grad():  # the weights made the round trip, not only the config
        np.testing.assert_allclose(back(ids).logits.numpy(), theirs(ids).logits.numpy(),
                                   atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "ckpt", "copy", "hf"]


def test_an_interrupted_save_leaves_nothing_that_looks_like_a_checkpoint(tmp_path, monkeypatch):
    model = mistral_jax.init(configs.preset("gpt2-tiny"))
    mistral_jax.save(model, tmp_path / "old")

    def fail(path, tree):
        (Path(path) / "half").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(files, "write_arrays", fail)
    with pytest.raises(OSError, match="disk full"):
        mistral_jax.save(model, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        mistral_jax.save(model, tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no new/, no .new.tmp-*
    monkeypatch.undo()
    assert mistral_jax.load(tmp_path / "old").config == model.config


# --- meshes that fit the machine and the model ---------------------------------------------------

NINE_HEADS = configs.MistralConfig(vocab_size=300, hidden_size=36, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=9,
                                   num_key_value_heads=3, head_dim=4, sliding_window=None,
                                   max_position_embeddings=128, bos_token_id=0, eos_token_id=1)


def test_auto_mesh_is_the_one_real_cpu_device_and_elsewhere_the_largest_model_axis():
    """On a CPU, auto is the real device even with the 8 fake ones of this process; for a count
    of GPUs or TPUs, every device with the largest model axis that fits."""
    mesh, said = devices.mesh_for("auto", NINE_HEADS)  # SmolLM2's 9 heads, 3 kv heads
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "model": 1}
    assert list(mesh.devices.flat) == jax.devices()[:1]
    assert said == ("--mesh auto: 1x1 (the one CPU device; a larger --mesh makes fake CPU "
                    "devices, which share its cores and run slower)")
    assert next(devices.fitting_meshes(NINE_HEADS, [8])) == (8, 1)
    assert next(devices.fitting_meshes(configs.preset("mistral-20m"), [8])) == (1, 8)
    with pytest.raises(mistral_jax.ShardingError, match="--mesh 1x8: num_attention_heads=9 is "
                       "not divisible by the model axis 8; .*--mesh 8x1 fits"):
        devices.mesh_for("1x8", NINE_HEADS)


def test_fine_tuning_a_nine_head_model_picks_a_mesh_and_says_which(text_ckpt, tmp_path,
                                                                   capsys):
    tok = mistral_jax.load(text_ckpt[1]).tokenizer
    config = dataclasses.replace(NINE_HEADS, vocab_size=tok.vocab_size)
    # random weights drawn by numpy (mistral_jax.init's jax.random compiles a program a shape)
    model, rng = registry.abstract(config, tokenizer=tok), np.random.default_rng(0)
    mistral_jax.save(trees.with_weights(model, trees.unflatten({
        name: jax.numpy.asarray(np.ones(x.shape, np.float32) if name.endswith("norm")
                                else 0.02 * rng.standard_normal(x.shape, np.float32))
        for name, x in trees.flatten(trees.weights(model)).items()})), tmp_path / "nine")
    (tmp_path / "data.txt").write_text(default.CORPUS.read_text()[:4000])
    assert finetune.main(["--init", str(tmp_path / "nine"), "--data", str(tmp_path / "data.txt"),
                          "--out", str(tmp_path / "out"), "--steps", "1", "--seq-len", "32",
                          "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "note: --mesh auto: 1x1 (the one CPU device; " in err
    assert (tmp_path / "out" / "final" / "weights").is_dir()
    rows = [json.loads(r) for r in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [0 < r["mfu"] < 1 for r in rows if "loss" in r] == [True]


# --- no silent wrong answers ---------------------------------------------------------------------


def test_gpt2_refuses_positions_it_never_learned():
    model = mistral_jax.init(configs.preset("gpt2-tiny"))  # 128 learned positions
    ids = np.ones((1, 178), np.int32)
    said = "input_ids needs 178 positions, and this GPT-2 learned 128"
    with pytest.raises(ValueError, match=said):
        mistral_jax.forward(model, ids)
    with pytest.raises(ValueError, match=said):
        mistral_jax.loss(model, ids)
    with pytest.raises(ValueError, match="positions, and this GPT-2 learned 128"):
        mistral_jax.forward(model, ids[:, :10], positions=np.arange(120, 130)[None])
    with pytest.raises(ValueError, match="a prompt of 100 tokens \\+ max_new_tokens=40 needs 140"):
        mistral_jax.generate_tokens(model, ids[:, :100], max_new_tokens=40)
    assert mistral_jax.forward(model, ids[:, :128]).shape == (1, 128, 128)


def test_rope_models_past_their_trained_length_warn_once_and_go_on(capsys):
    config = configs.preset("mistral-tiny")  # max_position_embeddings=256
    model = mistral_jax.init(config)
    ids = np.ones((1, 300), np.int32)
    first = mistral_jax.forward(model, ids)
    mistral_jax.loss(model, ids)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: input_ids needs 300 positions, more than max_position_embeddings=256,"
                   " the length this model was trained for; RoPE goes on past it, but the output "
                   "may degrade"]
    assert np.isfinite(np.asarray(first)).all()


def test_parity_fails_a_conversion_with_q_and_k_in_the_wrong_rope_order(text_ckpt, tmp_path,
                                                                         capsys):
    hf, ckpt = text_ckpt
    assert parity.main([str(hf), str(ckpt)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("[ok]")
    model = mistral_jax.load(ckpt)
    h = model.config.head_dim
    interleaved = np.stack([np.arange(h // 2), np.arange(h // 2) + h // 2], axis=1).reshape(-1)
    for name in ("q", "k"):  # what a converter that forgot the RoPE permutation would write
        w = getattr(model.layers, name)
        w[...] = w[...][..., interleaved]
    mistral_jax.save(model, tmp_path / "permuted")
    assert parity.main([str(hf), str(tmp_path / "permuted")]) == 1
    line = capsys.readouterr().out.strip()
    assert line.endswith("[FAIL: logits, top1, perplexity]"), line


# The run of test_keep_holds_the_last_checkpoints, and the step test_packed_examples_... below
# takes its first loss from: the same flags, so one compiled train step serves both (the compilation
# cache), not two.
KEEP_RUN = ["--steps", "4", "--seq-len", "128", "--batch-size", "8", "--mesh", "1x8",
            "--remat", "dots"]


def test_packed_examples_are_isolated_by_default(text_ckpt, tmp_path, capsys):
    """The first step's loss is the examples' loss each alone; --no-isolate-documents is the
    opt-out and gives another. Data smaller than one batch is reported."""
    _, ckpt = text_ckpt
    model = mistral_jax.load(ckpt)
    tok = model.tokenizer
    examples = [("LAWYER, n.", " One skilled in circumvention of the law."),
                ("ABSURDITY, n.", " A statement or belief manifestly inconsistent."),
                ("BORE, n.", " A person who talks when you wish him to listen.")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in examples))
    # Each alone, transformers' way: loss on the completion. One row each, padded at the end
    # (ignored labels, after every real token under the causal mask): one compiled loss for
    # the three, the mean over all their completion tokens.
    rows = [(tok.encode(p), tok.encode_text(c) + [tok.eos_id]) for p, c in examples]
    width = max(len(p) + len(c) for p, c in rows)
    pad = [width - len(p) - len(c) for p, c in rows]
    ids = np.asarray([p + c + [tok.eos_id] * n for (p, c), n in zip(rows, pad, strict=True)])
    labels = np.asarray([[-100] * len(p) + c + [-100] * n
                         for (p, c), n in zip(rows, pad, strict=True)])
    alone = float(mistral_jax.loss(model, ids, labels=labels))

    def first_loss(*extra):
        # the flags of test_keep_holds_the_last_checkpoints' run: one compiled step for both
        out = tmp_path / f"out{len(extra)}"
        assert finetune.main(["--init", str(ckpt), "--data", str(data), "--out", str(out),
                              *KEEP_RUN, *extra]) == 0
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        return rows[0]["loss"]

    assert abs(first_loss() - alone) < 1e-5
    err = capsys.readouterr().err
    assert "warning: the training data: 3 documents, " in err
    assert "1 row of 128 tokens: fewer than one batch of 8, so each batch repeats rows; over 4 " \
        "steps each row is seen about 32 times" in err
    assert abs(first_loss("--no-isolate-documents") - alone) > 1e-3


# --- the small things ----------------------------------------------------------------------------


def test_help_shows_the_defaults_and_speaks_to_users(capsys):
    text = generate_cli.arguments().format_help()
    for default_text in ("most tokens to generate (default: 64)", "(default: 0.0)",
                         "seed of the sampling (default: 0)"):
        assert default_text in " ".join(text.split()), text
    with pytest.raises(SystemExit):
        from_torch.main(["--help"])
    text = capsys.readouterr().out
    assert "--overwrite" in text and "Hugging Face model folder" in text
    for internal in ("detect(", "plan(", "add_arguments", "keyword arguments"):
        assert internal not in text


def test_converting_into_an_existing_folder_says_overwrite_before_any_work(tmp_path, capsys,
                                                                           monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(from_torch, "resolve", lambda *a: pytest.fail("did work first"))
    assert from_torch.main(["anything", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'out'} already exists; pass "
                                       "--overwrite to replace it, or choose another OUT\n")


def test_a_hub_id_without_a_network_ends_in_one_line(tmp_path):
    env = {**user_env(), "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9 (discard)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "convert.from_torch", "someone/some-model",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: someone/some-model: cannot reach the Hub "
                                  "(http://127.0.0.1:9) and it is not in the Hugging Face cache; "
                                  "set HF_HUB_OFFLINE=1")
    assert not (tmp_path / "out").exists()


def test_paths_that_are_not_checkpoints_say_what_they_are(text_ckpt, tmp_path, capsys):
    hf, _ = text_ckpt
    with pytest.raises(mistral_jax.CheckpointError, match="nowhere does not exist"):
        mistral_jax.load(tmp_path / "nowhere")
    convert_first = (f"{hf} is a Hugging Face model folder, not a mistral_jax checkpoint; "
                     f"convert it first: python -m convert.from_torch {hf} {hf.parent / 'hf-jax'}")
    assert generate_cli.main([str(hf), "Hi"]) == 1
    assert capsys.readouterr().err == f"error: {convert_first}\n"
    assert to_torch.main([str(hf), str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == f"error: {convert_first}\n"
    assert finetune.main(["--init", str(hf), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: {convert_first}\n"
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"GGUF")
    assert generate_cli.main([str(tmp_path / "model.Q4_0.gguf"), "Hi"]) == 1
    assert "is a GGUF file, not a mistral_jax checkpoint; convert it first: python -m " \
        f"convert.from_torch {tmp_path / 'model.Q4_0.gguf'} {tmp_path / 'model.Q4_0-jax'}" \
        in capsys.readouterr().err


def test_a_config_that_disagrees_with_the_weights_says_which_field_first(tmp_path):
    mistral_jax.save(mistral_jax.init(configs.preset("mistral-tiny")), tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["hidden_size"] = 40
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(mistral_jax.CheckpointError) as e:
        mistral_jax.load(tmp_path / "c")
    first, *tensors = str(e.value).splitlines()
    assert first == f"{tmp_path / 'c'}: config.json says hidden_size 40; the weights have 32"
    assert "  embed: shape (128, 32), config needs (128, 40)" in tensors and len(tensors) > 3


def test_a_file_named_safetensors_that_is_not_one(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_text("not really")
    assert from_torch.main([str(tmp_path / "model.safetensors"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'model.safetensors'}: not a "
                                       "safetensors file (its header is unreadable)\n")
    hf_model("gpt2", tmp_path / "real")
    shutil.copy(tmp_path / "real" / "model.safetensors", tmp_path / "bare.safetensors")
    assert from_torch.main([str(tmp_path / "bare.safetensors"), str(tmp_path / "out")]) == 1
    assert "is a bare safetensors file; give the folder that holds it" in \
        capsys.readouterr().err


def test_a_batch_of_conversations(text_ckpt):
    _, ckpt = text_ckpt
    params = mistral_jax.load(ckpt)
    chats = [[{"role": "user", "content": "Hello there"}],
             [{"role": "user", "content": "What is a lawyer?"}]]
    batch = mistral_jax.generate(params, messages=chats, max_new_tokens=6)
    assert batch == [mistral_jax.generate(params, messages=c, max_new_tokens=6) for c in chats]
    assert all(batch)  # two replies, not two empty strings that agree


def test_generate_takes_a_dtype(text_ckpt, capsys):
    _, ckpt = text_ckpt
    assert generate_cli.main([str(ckpt), "LAWYER", "--max-new-tokens", "5", "--dtype",
                              "bfloat16"]) == 0
    bf16 = mistral_jax.load(ckpt, dtype="bfloat16")
    text = mistral_jax.generate(bf16, "LAWYER", max_new_tokens=5)
    assert text and capsys.readouterr().out == "LAWYER" + text + "\n"


def test_float16_conversion(tmp_path):
    theirs = hf_model("llama", tmp_path / "hf")
    assert from_torch.main([str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--dtype",
                            "float16"]) == 0
    params = mistral_jax.load(tmp_path / "ckpt")
    assert params.layers.q[...].dtype == np.float16
    ids = np.random.default_rng(0).integers(0, 96, (1, 12))
    with torch.no_grad():
        ref = theirs(torch.tensor(ids)).logits.numpy()
    got = np.asarray(mistral_jax.forward(params, ids))
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9 and np.abs(got - ref).max() < 0.05


def test_keep_holds_the_last_checkpoints(text_ckpt, tmp_path):
    _, ckpt = text_ckpt
    (tmp_path / "d.txt").write_text(default.CORPUS.read_text()[:3000])
    assert finetune.main(["--init", str(ckpt), "--data", str(tmp_path / "d.txt"), "--out",
                          str(tmp_path / "run"), *KEEP_RUN, "--save-every", "1", "--keep",
                          "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3", "4"]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [0 < r["mfu"] < 1 for r in rows if "loss" in r] == [True] * 4  # remat: not counted


def test_eval_gives_transformers_loss_on_the_same_tokens(text_ckpt, tmp_path, capsys):
    """train.eval packs like fine-tuning, each document alone; transformers runs each packed
    segment by itself and the summed losses agree."""
    hf, ckpt = text_ckpt
    from train.input import data as D

    entries = default.entries(default.CORPUS.read_text())[40:60]
    (tmp_path / "val.jsonl").write_text("".join(
        json.dumps({"prompt": e[:20], "completion": e[20:]}) + "\n" for e in entries[:10]))
    (tmp_path / "val.txt").write_text("\n\n".join(entries[10:]))
    files_ = [str(tmp_path / "val.jsonl"), str(tmp_path / "val.txt")]
    assert eval_cli.main([str(ckpt), "--data", *files_, "--seq-len", "64", "--batch-size",
                          "4"]) == 0
    printed = capsys.readouterr().out.split()  # loss X, perplexity Y, N tokens
    loss, ppl, tokens = float(printed[1].rstrip(",")), float(printed[3].rstrip(",")), int(
        printed[4].replace(",", ""))
    tok = mistral_jax.load(ckpt).tokenizer
    docs = [d for f in files_ for d in D.read_documents(f)]
    rows = D.pack(D.tokenize(docs, tok), 64, pad_id=tok.eos_id)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    total, count = 0.0, 0
    for ids, labels, segments in zip(rows.ids, rows.labels, rows.segments, strict=True):
        for s in np.unique(segments[segments >= 0]):
            part = segments == s
            seg_ids, seg_labels = ids[part], labels[part].copy()
            seg_labels[0] = -100  # never predicted from another document
            n = int((seg_labels[1:] != -100).sum())
            if n == 0:
                continue
            with torch.no_grad():
                out = theirs(torch.tensor(seg_ids[None]).long(),
                             labels=torch.tensor(seg_labels[None]).long())
            total += out.loss.item() * n
            count += n
    assert tokens == count
    assert abs(loss - total / count) < 1e-4
    assert abs(ppl - np.exp(total / count)) / ppl < 1e-3


def test_lora_without_a_base_checkpoint_is_refused(tmp_path, capsys):
    assert finetune.main(["--lora-rank", "4", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("error: --lora-rank needs --init CKPT: adapters adapt a "
                                       "checkpoint (the default run starts from random weights "
                                       "that are not saved)\n")
    assert not (tmp_path / "run").exists()
