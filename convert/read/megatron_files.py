"""Finding a Megatron-LM checkpoint's files and reading its shards.

SRC is NVIDIA's NGC `.zip` (`release/mp_rank_00/model_optim_rng.pt` inside), one `.pt` file, or a
checkpoint directory (`latest_checkpointed_iteration.txt`, `iter_NNNNNNN/` or `release/`, each
holding `mp_rank_XX[_YYY]/model_optim_rng.pt`), or the iteration or rank directory inside one.
Every torch file is read through `convert.read.pickles.load_torch`, memory-mapped where it can be.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from convert.read.errors import ConversionError
from mistral_jax.base import trees

if TYPE_CHECKING:  # torch itself comes in with the first pickle read (convert.read.pickles)
    import torch

TRACKER = "latest_checkpointed_iteration.txt"
FILES = ("model_optim_rng.pt", "model_rng.pt")
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")  # TP rank, pipeline stage


@dataclass
class Shard:
    """One model_optim_rng.pt: its model tensors (flattened keys), version and args (a dict;
    empty when the checkpoint saved none)."""

    where: str
    tensors: dict[str, torch.Tensor]
    version: float
    args: dict


def dir_names(root: Path) -> list[str]:
    if RANK_DIR.match(root.name):  # a rank directory: its iteration holds every rank
        root = root.parent
    names = [p.relative_to(root).as_posix() for depth in ("*", "*/*", "*/*/*")
             for p in root.glob(depth) if p.name in (*FILES, TRACKER)]
    return sorted(names)


def zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n for n in zf.namelist() if n.rsplit("/", 1)[-1] in (*FILES, TRACKER)]
    except (zipfile.BadZipFile, OSError) as e:
        raise ConversionError(f"{path}: not a readable zip file ({e})") from None


def find_layout(names: list[str], where: Path, read=None) -> dict[tuple[int, int], str] | None:
    """The checkpoint files of one iteration by (TP rank, pipeline stage), from relative names;
    None when there are none. `read(name)` reads a tracker file when several iterations exist."""
    iterations: dict[str, dict[tuple[int, int], str]] = {}
    for name in names:
        *dirs, file = name.split("/")
        if file in FILES and dirs and (m := RANK_DIR.match(dirs[-1])):
            ranks = iterations.setdefault("/".join(dirs[:-1]), {})
            ranks.setdefault((int(m[1]), int(m[2] or 0)), name)
    if len(iterations) <= 1 or read is None:
        return next(iter(iterations.values()), None)
    for tracker in (n for n in names if n.rsplit("/", 1)[-1] == TRACKER):
        text = read(tracker).strip()
        if text != "release" and not text.isdigit():
            raise ConversionError(f"{where}/{tracker}: {text!r} is neither an iteration nor "
                                  "'release'")
        leaf = "release" if text == "release" else f"iter_{int(text):07d}"
        chosen = f"{tracker.rpartition('/')[0]}/{leaf}".lstrip("/")
        if chosen not in iterations:
            raise ConversionError(f"{where}/{tracker} names {text!r}, but {chosen} holds no "
                                  f"{FILES[0]}")
        return iterations[chosen]
    raise ConversionError(f"{where} holds several checkpoints ({', '.join(sorted(iterations))}) "
                          f"and no {TRACKER} to choose one; point at the one to convert")


def load_torch(path: Path, **kwargs):
    """convert.read.pickles.load_torch, imported (with torch) only when a shard is read."""
    from convert.read.pickles import load_torch

    return load_torch(path, **kwargs)


def read_shards(path: Path) -> list[list[Shard]]:
    """Every shard, as [pipeline stage][TP rank]."""
    if path.is_file() and path.suffix != ".zip":
        parent = path.parent
        if path.name in FILES and RANK_DIR.match(parent.name):  # a file inside a rank directory
            path = parent
        else:
            return [[_shard(path.as_posix(), load_torch(path))]]
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            files = find_layout(zip_names(path), path, lambda n: zf.read(n).decode())
    else:
        root = path.parent if RANK_DIR.match(path.name) else path
        files = find_layout(dir_names(path), path, lambda n: (root / n).read_text())
        files = files and {rank: str(root / name) for rank, name in files.items()}
    if not files and path.is_dir() and next(path.glob("*/*.distcp"), None):
        raise ConversionError(f"{path}: a torch_dist (distributed) checkpoint; save it in the "
                              "torch format first (Megatron's --ckpt-convert-format torch)")
    if not files:
        raise ConversionError(f"{path}: no Megatron checkpoint ({' or '.join(FILES)} under "
                              "mp_rank_XX directories) found")
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(p for _, p in files)
    absent = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
              for p in range(pp) for t in range(tp) if (t, p) not in files]
    if absent:
        raise ConversionError(f"{path}: shards {', '.join(absent)} are absent (found "
                              f"{len(files)} of {tp} TP x {pp} pipeline)")
    if path.is_file():
        return [[_shard(f"{path}/{files[t, p]}", _load_member(path, files[t, p]))
                 for t in range(tp)] for p in range(pp)]
    return [[_shard(files[t, p], load_torch(files[t, p])) for t in range(tp)] for p in range(pp)]


def _load_member(zip_path: Path, name: str):
    """A torch file inside a zip: copied out to a temporary file, memory-mapped, and unlinked at
    once (the mapping outlives the name), so nothing is left on disk."""
    where = f"{zip_path}/{name}"
    fd, tmp = tempfile.mkstemp(suffix=".pt")
    try:
        with zipfile.ZipFile(zip_path) as zf, zf.open(name) as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        return load_torch(tmp, where=where)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ConversionError(f"{where}: cannot read from the zip ({e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _shard(where: str, ckpt) -> Shard:
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{where}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    if "model0" in ckpt:
        raise ConversionError(f"{where}: a virtual-pipeline checkpoint (model0, model1, ...); "
                              "convert it to one model per stage with Megatron's "
                              "tools/checkpoint first")
    model = ckpt["model"] if "model" in ckpt else ckpt  # or a bare state dict
    flat = trees.flatten(model) if isinstance(model, dict) else {}
    import torch

    tensors = {k: v for k, v in flat.items()
               if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    if not tensors:
        raise ConversionError(f"{where}: no model tensors (keys: {', '.join(map(str, ckpt))})")
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args  # some forks save a dict
    return Shard(where, tensors, float(ckpt.get("checkpoint_version", 0)),
                 dict(args) if isinstance(args, dict) else {})
