"""README.md as a user follows it: its commands, read out of its code blocks, run as written
from an empty working directory with the paths they show (relative ones), in README order.

The only changes are flags appended to shorten the work (`--steps`, a shorter `--seq-len`,
fewer new tokens) and the `python` that runs them (this virtualenv's). Python blocks run in one
namespace, as one session would. The files a command expects to find (`path/to/hf-folder`,
`train.jsonl`, `val.jsonl`) are made first: a tiny random transformers Mistral with a real BPE
tokenizer and a chat template, and JSONL from the shipped corpus.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import mistral_jax
from mistral_jax.base import trees
from tests.reference import text_model
from train import default

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTIONS = ("mistral_jax", "Quickstart", "Generation", "Reduced precision", "Fine-tuning",
            "LoRA adapters")
PYTHONS = ("python", ".venv/bin/python")
SKIPPED = ("pytest",)  # the suite running this test
# appended to shorten a command: argparse takes the last of a repeated flag
SHORTEN = {"train.finetune": ["--steps", "3", "--seq-len", "64", "--batch-size", "8",
                              "--eval-every", "3", "--save-every", "3", "--eval-batches", "1"],
           "mistral_jax.generate": ["--max-new-tokens", "8"]}



def blocks() -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block of README, in order."""
    found, heading = [], ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        if m := re.match(r"#+ (.*)", lines[i]):
            heading = m.group(1).strip()
        elif m := re.match(r"```(\w+)", lines[i]):
            end = lines.index("```", i + 1)
            found.append((heading, m.group(1), "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return found


def commands(code: str) -> list[list[str]]:
    """The command lines of a bash block as argv lists (continuations joined, comments cut,
    `a && b` taken as its last command)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while "&&" in argv:
            argv = argv[argv.index("&&") + 1:]
        if argv:
            out.append(argv)
    return out


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert argv[0] in PYTHONS and argv[1] == "-m", f"README runs {argv[0]} directly: {argv}"
    module = argv[2]
    args = []
    for a in argv[3:]:
        matches = sorted(glob.glob(a, root_dir=cwd)) if "*" in a else [a]
        assert matches, f"{a} matches nothing in {cwd}"
        args += matches
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user's shell
    proc = subprocess.run([sys.executable, "-m", module, *args, *SHORTEN.get(module, [])],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n" \
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def make_inputs(cwd: Path) -> None:
    text_model(cwd / "path" / "to" / "hf-folder")
    entries = default.entries(default.CORPUS.read_text())
    for name, part in (("train.jsonl", entries[:300]), ("val.jsonl", entries[300:340])):
        (cwd / name).write_text("".join(json.dumps({"prompt": e[:30], "completion": e[30:]})
                                        + "\n" for e in part))


@pytest.fixture(scope="module")
def followed(tmp_path_factory):
    """Every command of the README's sections, run in order; {argv as text: result}."""
    cwd = tmp_path_factory.mktemp("user")
    make_inputs(cwd)
    results, namespace = {}, {}
    before = os.getcwd()
    os.chdir(cwd)
    try:
        for heading, lang, code in blocks():
            if heading not in SECTIONS:
                continue
            if lang == "python":
                exec(compile(code, f"README.md ({heading})", "exec"), namespace)  # noqa: S102
            elif lang == "bash":
                for argv in commands(code):
                    if not any(s in argv for s in SKIPPED):
                        results[" ".join(argv)] = run(argv, cwd)
    finally:
        os.chdir(before)
    return cwd, results, namespace


def result(followed, start: str) -> subprocess.CompletedProcess:
    _, results, _ = followed
    found = [r for k, r in results.items() if k.startswith(start)]
    assert found, f"README no longer runs a command starting {start!r}"
    return found[0]


def test_the_readme_sections_have_commands():
    sections = {h for h, lang, _ in blocks() if lang in ("bash", "python")}
    assert set(SECTIONS) <= sections


def test_the_main_job_trains_and_generate_loads_what_it_wrote(followed):
    cwd, results, _ = followed
    (run_dir,) = (cwd / "runs").iterdir()  # the default --out, relative to where it ran
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert loss[3] < loss[1]
    assert all(0 < r["mfu"] < 1 for r in rows if "loss" in r)  # the default model's MFU
    assert (run_dir / "final" / "weights").is_dir() and not list(run_dir.glob(".final*"))
    assert mistral_jax.load(run_dir / "final").config == default.CONFIG
    assert result(followed, "python -m mistral_jax.generate runs/").stdout.startswith(
        "LAWYER, n.")
    # the command README suggests first samples: the 5M model's greedy text is `the` per line
    (first,) = [argv for argv in results if argv.startswith("python -m mistral_jax.generate runs/")]
    assert "--temperature 0.8" in first, first
    assert "[FAIL" not in result(followed, "python -m convert.parity --demo").stdout


def test_the_quickstart_converts_checks_and_exports(followed):
    cwd, _, namespace = followed
    parity = result(followed, "python -m convert.parity path/to/hf-folder ckpt/").stdout
    assert parity.rstrip().endswith("[ok]"), parity
    theirs = transformers.AutoModelForCausalLM.from_pretrained(cwd / "path/to/hf-folder").eval()
    again = transformers.AutoModelForCausalLM.from_pretrained(cwd / "hf-out").eval()
    ids = torch.tensor(namespace["ids"])
    with torch.no_grad():
        np.testing.assert_allclose(again(ids).logits.numpy(), theirs(ids).logits.numpy(),
                                   atol=1e-5)
    assert namespace["logits"].shape == (1, ids.shape[1], theirs.config.vocab_size)
    assert set(namespace["grads"].layers.q[...].shape) == set(
        namespace["model"].layers.q[...].shape)


def test_generation_from_python_and_the_command_line(followed):
    _, _, namespace = followed
    assert namespace["tokens"].shape == (1, 16)
    out = result(followed, "python -m mistral_jax.generate ckpt/ My favourite").stdout
    assert out.startswith("My favourite condiment is")
    chat = result(followed, "python -m mistral_jax.generate ckpt/ Hello! --chat --mesh 1x8")
    assert "tokens/s" in chat.stderr and "8 CPU devices" in chat.stderr


def test_reduced_precision_as_written(followed):
    cwd, results, namespace = followed
    model = mistral_jax.load(cwd / "ckpt-int8")
    assert model.layers.q[...].dtype == np.int8 and model.layers.q_scale[...].dtype == np.float32
    for flags in ("ckpt-int8/ My favourite condiment is --kv-cache-dtype int8 --verbose",
                  "ckpt/ My favourite condiment is --dtype bfloat16 --verbose"):
        out = results[f"python -m mistral_jax.generate {flags}"]
        assert out.stdout.startswith("My favourite condiment is") and "tokens/s" in out.stderr
    quantized = namespace["quantized"]
    assert quantized.kv_cache_dtype == "int8" and quantized.layers.q[...].dtype == np.int8


def test_fine_tuning_resumes_evaluates_and_exports(followed):
    cwd, _, _ = followed
    assert (cwd / "run" / "final" / "weights").is_dir()
    resumed = result(followed, "python -m train.finetune --init ckpt/ --data train.jsonl "
                     "--eval-data val.jsonl --out run/ --steps 2000 --batch-size 32 "
                     "--seq-len 1024 --lr 2e-5 --grad-accum 4 --remat dots --dtype bfloat16 "
                     "--resume")
    assert "resumed from step 3" in resumed.stderr
    evaluated = result(followed, "python -m train.eval run/final --data val.jsonl").stdout
    assert re.fullmatch(r"loss [\d.]+, perplexity [\d.]+, [\d,]+ tokens\n", evaluated)
    # what fine-tuning wrote exports to a folder transformers loads, with our logits
    trained = mistral_jax.load(cwd / "run" / "final")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(cwd / "hf-run").eval()
    ids = np.asarray([trained.tokenizer.encode("LAWYER, n. One skilled in")])
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(mistral_jax.forward(trained, ids)), expected,
                               atol=1e-4)


def test_lora_adapters_go_everywhere(followed):
    cwd, _, namespace = followed
    assert (cwd / "lora-run" / "adapters" / "adapter_config.json").is_file()
    assert not (cwd / "lora-run" / "final").exists()
    assert (cwd / "merged" / "weights").is_dir()
    peft_config = json.loads((cwd / "peft-out" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 8
    assert peft_config["base_model_name_or_path"] == "hf-out/"  # the Quickstart's export
    adapted = result(followed, "python -m mistral_jax.generate ckpt/ My favourite condiment "
                     "is --adapters").stdout
    assert adapted.startswith("My favourite condiment is")
    merged = trees.flatten(trees.weights(mistral_jax.load(cwd / "merged")))
    loaded = trees.flatten(trees.weights(namespace["model"]))  # load(adapters=) in README
    for name, value in merged.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(value))


def test_the_serving_section_as_written(followed):
    """README's Serving commands in the folder the other sections left (`ckpt/` is there): the
    server command started as written and stopped with SIGTERM, the curl and the openai client
    examples against it, and the terminal chat fed `/exit`. (`pip install` is what
    scripts/setup.sh did already.)"""
    cwd, _, _ = followed
    (bash, curl), python = [c for h, lang, c in blocks() if h == "Serving" and lang == "bash"], \
        next(c for h, lang, c in blocks() if h == "Serving" and lang == "python")
    lines = {argv[2]: argv for argv in commands(bash) if argv[0] in PYTHONS}
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    serve = lines["mistral_jax.serve"]
    server = subprocess.Popen([sys.executable, *serve[1:]], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = int(serve[serve.index("--port") + 1])
        deadline = time.monotonic() + 180
        while True:  # until it answers /health
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    server.stdout.read() if server.poll() is not None else "no /health in 180 s"
                time.sleep(1)
        (argv,) = commands(curl)
        answer = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
        reply = json.loads(answer.stdout)
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] > 0
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(python, "README.md (Serving)", "exec"), {})  # noqa: S102
        model = mistral_jax.load(cwd / "ckpt")
        text = mistral_jax.generate(model, "My favourite condiment is", max_new_tokens=40)
        assert printed.getvalue().startswith(text)  # the greedy completion the example prints
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    chat = lines["mistral_jax.chat"]
    done = subprocess.run([sys.executable, *chat[1:]], cwd=cwd, env=env, input="/exit\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
