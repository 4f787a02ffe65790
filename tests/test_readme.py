"""README.md and every page under docs/ as a user follows them: their commands, read out of
their code blocks, run as written from an empty working directory with the paths they show
(relative ones), README first, then the docs pages in the order README links them.

The only changes are flags appended to shorten the work (`--steps`, a shorter `--seq-len`,
fewer new tokens) and the `python` that runs them (this virtualenv's). A command two pages show
runs once. Each page's Python blocks run in a namespace of their own, as one session would. The
files the commands expect (`path/to/hf-folder`, `train.jsonl`, `val.jsonl`) are made first: a
tiny transformers Mistral with a BPE tokenizer and a chat template, JSONL from the corpus. SKIPPED
says what is not run, and why; the serving blocks run in their own test, on a live server."""

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
from typing import NamedTuple

import numpy as np
import pytest
import torch
import transformers

import mistral_jax
from mistral_jax.base import trees
from mistral_jax.text.chat_template import encode_chat
from tests.reference import ours, text_model
from train.input import default

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
JOBS = ("Convert", "Generate", "Serve", "Fine-tune", "Evaluate")  # README's quickstarts
PYTHONS = ("python", ".venv/bin/python")
NEW_TOKENS = 8
# appended to shorten a command: argparse takes the last of a repeated flag
SHORTEN = {**dict.fromkeys(("train.finetune", "train.dpo"), ["--steps", "3", "--seq-len", "64",
           "--batch-size", "8", "--eval-every", "3", "--save-every", "3", "--eval-batches", "1"]),
           "mistral_jax.generate": ["--max-new-tokens", str(NEW_TOKENS)]}
# a command matching the pattern is not run here, for the reason given
SKIPPED = {
    r"-m pytest": "the suite running this test",
    r"^pip install": "scripts/setup.sh installed the extras already",
    r"bench/run\.py": "every CPU benchmark, about 12 minutes (the figures in docs/benchmarks.md)",
    r"bench/gpu\.sh": "needs an NVIDIA GPU",
    r"convert\.from_torch (path/to/Mistral-7B-v0\.1/|mistralai/|mistral-7B-v0\.1/)":
        "Mistral-7B is a 14 GB download; tests/test_convert_streaming.py and "
        "tests/test_mistral_original.py convert small checkpoints of these formats",
    r"convert\.from_torch \S+\.gguf": "a GGUF download; tests/test_gguf.py converts small ones",
    r"convert\.from_torch (megatron_lm_345m|checkpoints/gpt2-345m|model_optim_rng\.pt)":
        "a Megatron-LM checkpoint from NGC; tests/test_megatron.py converts small ones",
}


def pages() -> list[Path]:
    """README, then the docs pages in the order its Documentation section lists them."""
    listed = README.read_text().split("\n## Documentation\n")[1].split("\n## ")[0]
    return [README, *(ROOT / p for p in re.findall(r"\]\((docs/[\w-]+\.md)\)", listed))]


def name(page: Path) -> str:  # docs/serving.md
    return page.relative_to(ROOT).as_posix()


def blocks(page: Path) -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block of `page`, in order."""
    found, heading = [], ""
    lines = page.read_text().splitlines()
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


def serving(page: Path, heading: str) -> bool:
    """Blocks that need a live server: test_the_serving_blocks_as_written runs them."""
    return page.name == "serving.md" or (page == README and heading == "Serve")


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


def skip_reason(line: str) -> str | None:
    return next((why for pattern, why in SKIPPED.items() if re.search(pattern, line)), None)


def user_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user's shell


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert argv[0] in PYTHONS and argv[1] == "-m", f"a page runs {argv[0]} directly: {argv}"
    module = argv[2]
    args = []
    for a in argv[3:]:
        matches = sorted(glob.glob(a, root_dir=cwd)) if "*" in a else [a]
        assert matches, f"{a} matches nothing in {cwd}"
        args += matches
    proc = subprocess.run([sys.executable, "-m", module, *args, *SHORTEN.get(module, [])],
                          cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n" \
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


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
                if serving(page, heading):
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
             if lang == "bash" and not serving(page, h) for argv in commands(code)}
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
             if serving(page, h) and lang in ("bash", "python")]
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


def wait_for_health(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, \
                server.stdout.read() if server.poll() is not None else "no /health in 180 s"
            time.sleep(1)


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
