"""README.md and every page under docs/ as a user follows them: their commands, read out of
their code blocks, run as written from an empty working directory with the paths they show
(relative ones), README first, then the docs pages in the order README links them.

The only changes are flags appended to shorten the work (`--steps`, a shorter `--seq-len`,
fewer new tokens) and the `python` that runs them (this virtualenv's). A command two pages show
runs once. Each page's Python blocks run in a namespace of their own, as one session would. The
files the commands expect (`path/to/hf-folder`, `train.jsonl`, `val.jsonl`) are made first: a
tiny transformers Mistral with a BPE tokenizer and a chat template, JSONL from the corpus. SKIPPED
says what is not run, and why; the serving blocks run in their own test, on a live server, and
README's whole path on a real model in test_readme_path.py (tests/pages.py reads the pages)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import transformers

import mistral_jax
from mistral_jax.base import trees
from mistral_jax.text.chat_template import encode_chat
from tests.pages import (
    NEW_TOKENS,
    PYTHONS,
    README,
    SKIPPED,
    blocks,
    commands,
    name,
    pages,
    run,
    section,
    skip_reason,
    user_env,
    wait_for_health,
)
from tests.reference import ours, text_model
from train.input import default

JOBS = ("Convert", "Generate", "Serve", "Fine-tune", "Evaluate")  # README's quickstarts


def make_inputs(cwd: Path) -> None:
    text_model(cwd / "path" / "to" / "hf-folder")
    entries = default.entries(default.CORPUS.read_text())
    for file, part in (("train.jsonl", entries[:300]), ("val.jsonl", entries[300:340])):
        (cwd / file).write_text("".join(json.dumps({"prompt": e[:30], "completion": e[30:]})
                                        + "\n" for e in part))
        (cwd / f"prefs-{file}").write_text("".join(json.dumps({"prompt": e[:30], "chosen": e[30:80],
                                          "rejected": e[80:]}) + "\n" for e in part if len(e) > 99))


class Followed(NamedTuple):
    cwd: Path
    results: dict  # command line -> CompletedProcess
    skipped: dict  # command line -> reason
    namespaces: dict  # page name -> the namespace its Python blocks ran in


@pytest.fixture(scope="module")
def followed(tmp_path_factory) -> Followed:
    """Every command of every page but the serving ones, run in order."""
    cwd = tmp_path_factory.mktemp("user")
    make_inputs(cwd)
    done = Followed(cwd, {}, {}, {})
    before = os.getcwd()
    os.chdir(cwd)
    try:
        for page in pages():
            namespace = done.namespaces.setdefault(name(page), {})
            for heading, lang, code in blocks(page):
                if section(page, heading) != "pages":
                    continue
                if lang == "python":
                    exec(compile(code, f"{name(page)} ({heading})", "exec"), namespace)  # noqa: S102
                elif lang == "bash":
                    for argv in commands(code):
                        line = " ".join(argv)
                        if why := skip_reason(line):
                            done.skipped[line] = why
                        elif line not in done.results:  # shown twice, run once
                            done.results[line] = run(argv, cwd)
    finally:
        os.chdir(before)
    return done


def result(followed: Followed, start: str) -> subprocess.CompletedProcess:
    found = [r for k, r in followed.results.items() if k.startswith(start)]
    assert found, f"no page runs a command starting {start!r} any more"
    return found[0]


def generated(followed: Followed, start: str, model, prompt: str, **sampling) -> str:
    """The command's stdout, which must be the prompt and then exactly the text the library's
    `generate` gives with the same options; returns that text (never empty)."""
    text = mistral_jax.generate(model, prompt, max_new_tokens=NEW_TOKENS, **sampling)
    assert text, f"generate gave no text for {prompt!r}"
    assert result(followed, start).stdout == prompt + text + "\n"
    return text


def test_readme_has_a_quickstart_per_job():
    headings = {h for h, lang, _ in blocks(README) if lang in ("bash", "python")}
    assert set(JOBS) <= headings


def test_every_command_ran_or_is_skipped_with_a_reason(followed):
    shown = {" ".join(argv) for page in pages() for h, lang, code in blocks(page)
             if lang == "bash" and section(page, h) == "pages" for argv in commands(code)}
    assert shown == set(followed.results) | set(followed.skipped)
    for pattern in SKIPPED:  # no reason kept for a command that is gone
        assert any(re.search(pattern, line) for line in followed.skipped), pattern
    assert len(followed.results) >= 20  # the docs pages' commands run, not only README's


def test_the_main_job_trains_and_generate_loads_what_it_wrote(followed):
    (run_dir,) = (followed.cwd / "runs").iterdir()  # the default --out, relative to where it ran
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert loss[3] < loss[1] and all(0 < r["mfu"] < 1 for r in rows if "loss" in r)
    assert (run_dir / "final" / "weights").is_dir() and not list(run_dir.glob(".final*"))
    trained = mistral_jax.load(run_dir / "final")
    assert trained.config == default.CONFIG
    # the command README suggests first samples (greedy text is `the` per line at this size)
    generated(followed, "python -m mistral_jax.generate runs/", trained, "LAWYER, n.",
              temperature=0.8, top_p=0.95)
    assert "[FAIL" not in result(followed, "python -m convert.parity --demo").stdout


def test_the_quickstart_converts_checks_and_exports(followed):
    cwd, namespace = followed.cwd, followed.namespaces["README.md"]
    parity = result(followed, "python -m convert.parity path/to/hf-folder ckpt/").stdout
    assert parity.rstrip().endswith("[ok]"), parity
    theirs = transformers.AutoModelForCausalLM.from_pretrained(cwd / "path/to/hf-folder").eval()
    again = transformers.AutoModelForCausalLM.from_pretrained(cwd / "hf-out").eval()
    ids = torch.tensor(namespace["ids"])
    with torch.no_grad():
        np.testing.assert_allclose(again(ids).logits.numpy(), theirs(ids).logits.numpy(), atol=1e-5)
    assert namespace["logits"].shape == (1, ids.shape[1], theirs.config.vocab_size)


def test_the_quickstart_gradients_are_transformers(followed, tmp_path):
    """`grads` holds every weight's gradient, shaped as the weight, with the values torch's
    backward pass gives (carried into our layout by the converter, as weights are)."""
    cwd, namespace = followed.cwd, followed.namespaces["README.md"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(cwd / "path/to/hf-folder")
    ids = torch.tensor(namespace["ids"])
    theirs(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(p.grad)
    theirs.save_pretrained(tmp_path / "grads")
    expected = trees.flatten(trees.weights(ours(tmp_path / "grads")))
    got = trees.flatten(trees.weights(namespace["grads"]))
    weights = trees.flatten(trees.weights(namespace["model"]))
    assert sorted(got) == sorted(expected) == sorted(weights)
    for key, value in got.items():
        assert value.shape == weights[key].shape == expected[key].shape, key
        np.testing.assert_allclose(np.asarray(value), np.asarray(expected[key]), rtol=1e-4,
                                   atol=1e-5, err_msg=key)


def test_generation_from_python_and_the_command_line(followed):
    cwd = followed.cwd
    assert followed.namespaces["docs/generation.md"]["tokens"].shape == (1, 16)
    model = mistral_jax.load(cwd / "ckpt")
    generated(followed, "python -m mistral_jax.generate ckpt/ My favourite condiment is "
              "--max-new-tokens", model, "My favourite condiment is")
    chat = result(followed, "python -m mistral_jax.generate ckpt/ Hello! --chat --mesh 1x8")
    sharded = mistral_jax.load(cwd / "ckpt", mesh=mistral_jax.make_mesh("1x8"))
    reply = mistral_jax.generate(sharded, messages=[{"role": "user", "content": "Hello!"}],
                                 max_new_tokens=NEW_TOKENS)
    assert reply and chat.stdout == reply + "\n"  # no prompt echoed with --chat
    assert "tokens/s" in chat.stderr and "8 CPU devices" in chat.stderr


def test_reduced_precision_as_written(followed):
    cwd, namespace = followed.cwd, followed.namespaces["docs/precision.md"]
    model = mistral_jax.load(cwd / "ckpt-int8", kv_cache_dtype="int8")
    q = model.layers.q
    assert (q.values[...].dtype, q.scale[...].dtype) == (np.int8, np.float32)
    prompt = "My favourite condiment is"
    generated(followed, f"python -m mistral_jax.generate ckpt-int8/ {prompt} --kv-cache-dtype "
              "int8 --verbose", model, prompt)
    generated(followed, f"python -m mistral_jax.generate ckpt/ {prompt} --dtype bfloat16 "
              "--verbose", mistral_jax.load(cwd / "ckpt", dtype="bfloat16"), prompt)
    assert "tokens/s" in result(followed, "python -m mistral_jax.generate ckpt-int8/").stderr
    quantized = namespace["quantized"]
    assert quantized.kv_cache_dtype == "int8" and quantized.layers.q.values[...].dtype == np.int8


def test_fine_tuning_resumes_evaluates_and_exports(followed):
    cwd = followed.cwd
    assert (cwd / "run" / "final" / "weights").is_dir()
    resumed = result(followed, "python -m train.finetune --init ckpt/ --data train.jsonl "
                     "--eval-data val.jsonl --out run/ --steps 2000 --batch-size 32 "
                     "--seq-len 1024 --lr 2e-5 --grad-accum 4 --remat dots --dtype bfloat16 "
                     "--resume")
    assert "resumed from step 3" in resumed.stderr
    trained = mistral_jax.load(cwd / "run" / "final")
    generated(followed, "python -m mistral_jax.generate run/final", trained,
              "My favourite condiment is")
    for ckpt in ("run/final", "ckpt/"):
        evaluated = result(followed, f"python -m train.eval {ckpt} --data val.jsonl").stdout
        assert re.fullmatch(r"loss [\d.]+, perplexity [\d.]+, [\d,]+ tokens\n", evaluated)
    # what fine-tuning wrote exports to a folder transformers loads, with our logits
    theirs = transformers.AutoModelForCausalLM.from_pretrained(cwd / "hf-run").eval()
    ids = np.asarray([trained.tokenizer.encode("LAWYER, n. One skilled in")])
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(mistral_jax.forward(trained, ids)), expected, atol=1e-4)


def test_lora_adapters_go_everywhere(followed):
    cwd = followed.cwd
    assert (cwd / "lora-run" / "adapters" / "adapter_config.json").is_file()
    assert not (cwd / "lora-run" / "final").exists()
    assert (cwd / "merged" / "weights").is_dir()
    peft_config = json.loads((cwd / "peft-out" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 8
    assert peft_config["base_model_name_or_path"] == "hf-out/"  # the Quickstart's export
    loaded = followed.namespaces["docs/fine-tuning.md"]["model"]  # load(adapters=) as shown
    generated(followed, "python -m mistral_jax.generate ckpt/ My favourite condiment is "
              "--adapters", loaded, "My favourite condiment is")
    merged = trees.flatten(trees.weights(mistral_jax.load(cwd / "merged")))
    loaded = trees.flatten(trees.weights(loaded))
    base = trees.flatten(trees.weights(mistral_jax.load(cwd / "ckpt")))
    assert any(not np.array_equal(loaded[k], base[k]) for k in base)  # the adapters are in
    for key, value in merged.items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value))


def test_the_attention_switch_as_written(followed):
    namespace = followed.namespaces["docs/attention.md"]
    np.testing.assert_allclose(np.asarray(namespace["logits"]), np.asarray(
        namespace["reference"]), atol=1e-5)


def test_tensor_parallelism_as_written(followed):
    namespace = followed.namespaces["docs/parallelism.md"]
    model = mistral_jax.load(followed.cwd / "ckpt")
    ids = namespace["ids"]
    np.testing.assert_allclose(np.asarray(namespace["logits"]),
                               np.asarray(mistral_jax.forward(model, ids)), atol=1e-4)


def test_the_serving_blocks_as_written(followed):
    """The serving blocks (README's Serve, docs/serving.md) in the folder the other pages left
    (`ckpt/` is there): the server command started as written and stopped with SIGTERM, every
    curl and openai client example against it, and the terminal chat fed `/exit`."""
    cwd = followed.cwd
    shown = [(page, lang, code) for page in pages() for h, lang, code in blocks(page)
             if section(page, h) == "serving" and lang in ("bash", "python")]
    lines = [argv for _, lang, code in shown if lang == "bash" for argv in commands(code)]
    by_kind = {}  # module or program -> its command lines
    for argv in lines:
        by_kind.setdefault(argv[2] if argv[0] in PYTHONS else argv[0], set()).add(shlex.join(argv))
    assert set(by_kind) == {"mistral_jax.serve", "curl", "mistral_jax.chat", "pip"}, by_kind
    assert all(skip_reason(line) for line in by_kind["pip"])
    (serve,), (chat,) = by_kind["mistral_jax.serve"], by_kind["mistral_jax.chat"]
    serve = shlex.split(serve)
    model = mistral_jax.load(cwd / "ckpt")
    server = subprocess.Popen([sys.executable, *serve[1:]], cwd=cwd, env=user_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_health(server, int(serve[serve.index("--port") + 1]))
        for curl in map(shlex.split, sorted(by_kind["curl"])):
            answer = subprocess.run(curl, cwd=cwd, capture_output=True, text=True, timeout=120)
            check_chat_reply(json.loads(answer.stdout), model, json.loads(curl[-1]))
        text = mistral_jax.generate(model, "My favourite condiment is", max_new_tokens=40)
        for page, _, code in (s for s in shown if s[1] == "python"):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"{name(page)} (serving)", "exec"), {})  # noqa: S102
            # the greedy completion the example prints first; the chat after it is sampled
            assert text and printed.getvalue().startswith(text + "\n")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    done = subprocess.run([sys.executable, *shlex.split(chat)[1:]], cwd=cwd, env=user_env(),
                          input="/exit\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def check_chat_reply(reply: dict, model, body: dict) -> None:
    """A greedy chat reply is generate()'s, and `usage` counts its prompt and exactly the tokens
    generated (the EOS included, as the engine counts)."""
    assert body["temperature"] == 0
    messages, most = body["messages"], body["max_tokens"]
    text = mistral_jax.generate(model, messages=messages, max_new_tokens=most)
    prompt = encode_chat(model.tokenizer, messages)
    row = mistral_jax.generate_tokens(model, [prompt], max_new_tokens=most)[0].tolist()
    eos = model.config.eos_token_id
    count = row.index(eos) + 1 if eos in row else most
    assert text and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == text
    assert reply["choices"][0]["finish_reason"] == ("length" if eos not in row else "stop")
    assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": count,
                              "total_tokens": len(prompt) + count}
