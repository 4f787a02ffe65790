"""Test set-up: 8 fake CPU devices, set before JAX starts (in every pytest-xdist worker too: each
imports this file before its tests import JAX). Matmul precision stays JAX's default, what users
get: the parity tests hold at it on a CPU.

The fixtures here are the expensive ones more than one module reads, built once per run (per
worker, under xdist). They are read-only: a test that changes a model takes `copy.copy` of it,
and one that writes into a checkpoint folder copies it into its own tmp_path first."""

import os

FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
if FAKE_DEVICES not in os.environ.get("XLA_FLAGS", ""):  # (xdist's workers inherit it)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAKE_DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One XLA compilation cache for the run, new each run: the workers and every CLI a test starts
# (a subprocess compiling the same tiny model's steps again) share it, so a program compiled once
# is loaded from disk after. Set in the controller before the workers start; they inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mistral_jax-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import pytest  # noqa: E402


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
