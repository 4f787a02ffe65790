"""How every directory this project writes comes to exist: whole or not at all.

A checkpoint, a fine-tuning run's final/ and adapters/, a conversion's output and an export
are each written into a hidden temporary sibling (`.NAME.tmp-...`) that is renamed into place
once complete, so an interrupted write never leaves a directory that looks finished, and
`overwrite` replaces an old one only when the new one is whole. Paths are made absolute here,
where they enter, so relative paths work the same as absolute ones (Orbax takes only absolute).
In a multi-process run every process writes its part into the same temporary directory;
process 0 makes it, and renames it once all processes are done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mistral_jax.arch.configs import Config, from_hf_dict, to_hf_dict

WEIGHTS = "weights"  # the Orbax-written arrays inside a checkpoint or adapters directory


class DirectoryExists(FileExistsError):
    """The output directory is there and overwriting it was not asked for."""


def check_new(path: str | os.PathLike, overwrite: bool) -> Path:
    """`path`, absolute; raise when it exists and `overwrite` is false."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise DirectoryExists(f"{path} already exists; choose another path or overwrite it "
                              "(--overwrite on the command line, overwrite=True in Python)")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on a clean exit it becomes `path`, on an exception it is
    removed and `path` is untouched."""
    path = check_new(path, overwrite)
    shared = jax.process_count() > 1  # every process must name the same directory
    tmp = path.with_name(f".{path.name}.tmp-{'shared' if shared else uuid.uuid4().hex[:8]}")
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)  # a shared one an interrupted run left
        tmp.mkdir(parents=True)
    _sync(f"made {tmp}")
    try:
        yield tmp
        _sync(f"wrote {tmp}")
        if primary:
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        _sync(f"renamed {tmp}")
    finally:
        if primary and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_config(directory: str | os.PathLike, error: type[Exception] = ValueError) -> Config:
    """The `config.json` (transformers' format) in `directory`, a checkpoint's or a Hugging
    Face folder's; one that does not parse, or asks for what mistral_jax does not do, raises
    `error` (the caller's kind) naming the file."""
    path = Path(directory) / "config.json"
    try:
        return from_hf_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise error(f"{path}: {e}") from None


def write_config(directory: Path, config: Config, tokenizer=None, **extra) -> None:
    """transformers' `config.json` (with `extra` keys) and the tokenizer file(s)."""
    if jax.process_index() == 0:
        (directory / "config.json").write_text(
            json.dumps({**to_hf_dict(config), **extra}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(directory)


def write_json(path: Path, record: dict) -> None:
    if jax.process_index() == 0:
        path.write_text(json.dumps(record, indent=2) + "\n")


def as_new_file(path: Path) -> None:
    """Give the file `path` the mode `open` gives a new file: 0666 less the umask (0644 under
    the usual 022). For files written by libraries that make them 0600 (safetensors)."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # elsewhere: set it to read it, and put it back at once
        os.umask(mask)
        return mask


def write_arrays(path: Path, tree: dict) -> None:
    """A nested dict of arrays as an Orbax checkpoint at `path` (every process its shards)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), tree)
        ckptr.wait_until_finished()


def stored_shapes(path: Path) -> dict:
    """The nested dict of `jax.ShapeDtypeStruct`s an Orbax checkpoint at `path` holds."""
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(Path(path).absolute()).item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def read_arrays(path: Path, target: dict) -> dict:
    """Restore the Orbax checkpoint at `path` into `target`'s shapes, dtypes and shardings."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), target)
