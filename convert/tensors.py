"""Reading torch-side tensors one at a time and mapping them onto our weights through a key map.

A key map is `{torch key (with "{i}" for the layer index): (our name or names, transform)}`.
`convert_tensors` applies it one tensor at a time, checks every shape against the model the
config describes, hands each weight (or layer of a stacked weight) to a sink, and reports every
problem at once.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import re
import struct
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from mistral_jax import models, trees
from mistral_jax.configs import Config
from mistral_jax.tokenizer import Tokenizer

KeyMap = dict[str, tuple[str | tuple[str, ...], Callable]]


class ConversionError(ValueError):
    """Source weights that do not fit the target model; the message lists every problem."""


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy, bfloat16 kept as ml_dtypes.bfloat16 (numpy has no bfloat16)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TensorSource:
    """Named tensors read lazily, one at a time, from safetensors files or torch pickles.

    A safetensors tensor is read from its offset when asked for, so memory holds one tensor at a
    time. A torch pickle goes through `convert.pickles.load_torch` (memory-mapped when the file
    is in torch's zip format); `release(key)` hands a mapped tensor's pages back once it has been
    converted. Other sources (merged tensor-parallel shards, GGUF files)
    subclass this and override `keys` and `get` (and `release` if they hold memory).
    """

    def __init__(self, files_by_key: dict[str, Path]):
        self.files_by_key = files_by_key
        self._open: dict[Path, object] = {}

    @classmethod
    def from_hf_folder(cls, path: Path) -> TensorSource:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                weight_map = json.loads((path / index).read_text())["weight_map"]
                files = {k: path / f for k, f in weight_map.items()}
                missing = sorted({str(f) for f in files.values() if not f.is_file()})
                if missing:
                    raise ConversionError(
                        f"{path / index} names shards that are absent: " + ", ".join(missing)
                    )
                source = cls(files)
                for f in dict.fromkeys(files.values()):  # read every header: fail early
                    source._handle(f)
                return source
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return cls.from_files([path / name])
        raise ConversionError(
            f"{path}: no model.safetensors, sharded safetensors index or pytorch_model.bin found"
        )

    @classmethod
    def from_files(cls, files: list[Path]) -> TensorSource:
        source = cls({})
        for f in files:
            source.files_by_key.update({k: f for k in source._handle(f).keys()})
        return source

    def keys(self) -> list[str]:
        return list(self.files_by_key)

    def get(self, key: str) -> np.ndarray:
        handle = self._handle(self.files_by_key[key])
        if isinstance(handle, SafetensorsFile):
            return handle.read(key)
        return to_numpy(handle[key])

    def release(self, key: str) -> None:
        """`key` has been converted: drop what memory it still holds."""
        handle = self._open.get(self.files_by_key[key])
        if isinstance(handle, dict) and isinstance(handle.get(key), torch.Tensor):
            _drop_mapped_pages(handle[key])

    def _handle(self, f: Path):
        if f not in self._open:
            if f.suffix == ".safetensors":
                self._open[f] = SafetensorsFile(f)
            else:
                from convert.pickles import load_torch  # it imports this module

                self._open[f] = load_torch(f)
        return self._open[f]


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                      "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """The tensors of one .safetensors file, each read from its offset straight into a new array
    when asked for (a memory map would leave the file's pages counted in the process's memory).

    The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the data. numpy reads bfloat16 too (as ml_dtypes.bfloat16).
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n)) if 8 + n <= size else None
        except (struct.error, ValueError):
            header = None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: not a safetensors file (its header is unreadable)")
        header.pop("__metadata__", None)
        self.start, self.header = 8 + n, header
        for key, info in header.items():
            begin, end = info["data_offsets"]
            if self.start + end > size:
                raise ConversionError(f"{path}: tensor {key} ends at byte {self.start + end} but "
                                      f"the file has {size} bytes (truncated?)")
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ConversionError(f"{path}: tensor {key} has dtype {info['dtype']}, which "
                                      "this converter does not read")

    def keys(self) -> list[str]:
        return list(self.header)

    def read(self, key: str) -> np.ndarray:
        info = self.header[key]
        begin, end = info["data_offsets"]
        dtype, shape = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
        if end - begin != dtype.itemsize * math.prod(shape):
            raise ConversionError(f"{self.path}: tensor {key} holds {end - begin} bytes, not "
                                  f"the {dtype.itemsize * math.prod(shape)} of {shape}")
        value = np.empty(shape, dtype)
        with open(self.path, "rb") as f:  # read straight into the array: no page stays mapped
            f.seek(self.start + begin)
            f.readinto(memoryview(value.reshape(-1).view(np.uint8)))
        return value


def _drop_mapped_pages(t: torch.Tensor) -> None:
    """Tell the kernel the file-backed pages under `t` (from `torch.load(mmap=True)`) are not
    needed any more; they stay readable (read again from the file if touched). A tensor that is
    not in a file mapping (a legacy pickle read into memory) is left alone: there the same call
    would zero its memory."""
    storage = t.untyped_storage()
    if storage.nbytes() < MADVISE_MIN:
        return
    mapping = _file_mapping(storage.data_ptr())
    if mapping is None:
        return
    begin = max(storage.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE, mapping[0])
    end = min(storage.data_ptr() + storage.nbytes(), mapping[1])
    _libc().madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), MADV_DONTNEED)


def _file_mapping(address: int) -> tuple[int, int] | None:
    """The [start, end) of the mapping of a file that holds `address`, from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    return (start, end) if len(fields) >= 6 and fields[5].startswith("/") \
                        else None
    except OSError:  # not Linux
        pass
    return None


MADVISE_MIN = 1 << 20  # small tensors share pages with their neighbours; leave them
MADV_DONTNEED = 4


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


Sink = Callable[[str, int | None, np.ndarray], None]  # (our name, layer or None, value)


@dataclass
class Plan:
    """What a source-format module hands `from_torch`: the model's config, where its tensors are,
    how they map onto our weights, and the tokenizer (None when the source has none)."""

    config: Config
    source: TensorSource
    keymap: KeyMap
    ignore: Collection[str] = ()
    tokenizer: Tokenizer | None = None
    notes: list[str] = field(default_factory=list)  # told to the user (defaults taken, etc.)
    origin: str = ""  # where the config came from (a file), named in errors

    def weights(self, dtype=None) -> dict:
        """Every weight in memory as a nested dict of numpy arrays (tests, small models)."""
        return self.convert(dtype=dtype)

    def convert(self, *, dtype=None, sink: Sink | None = None, progress: bool = False):
        """`convert_tensors` on this plan."""
        return convert_tensors(self.source, self.keymap, self.config, ignore=self.ignore,
                               dtype=dtype, sink=sink, progress=progress, origin=self.origin)


def key_pattern(key: str) -> re.Pattern:
    """A key map's key ("{i}" for the layer index) as a regex that captures the layer."""
    return re.compile(re.escape(key).replace(r"\{i\}", r"(\d+)") + "$")


def convert_tensors(source: TensorSource, keymap: KeyMap, config: Config, *, ignore=(),
                    dtype=None, sink: Sink | None = None, progress: bool = False,
                    origin: str = "") -> dict | None:
    """Map every tensor of `source` through `keymap` onto the weights `config` describes.

    The keys are checked first (unexpected, missing, layers beyond the config); then each tensor
    is read, transformed and shape-checked one at a time and handed to `sink(name, layer, value)`,
    or, without a sink, stacked into a nested dict that is returned. After the first problem the
    rest are only checked, so that one ConversionError reports every problem (saying that the
    config came from `origin`).
    """
    expected = {
        k: v.shape for k, v in trees.flatten(trees.weights(models.abstract(config))).items()
    }
    patterns = [(key_pattern(k), _tuple(names), fn) for k, (names, fn) in keymap.items()]
    work = []  # (source key, our names, transform, layer)
    seen: dict[str, set] = {}  # our name -> layers (or {None}) a source tensor was found for
    problems: list[str] = []
    for key in source.keys():
        if key in ignore:
            continue
        match = next(((m, names, fn) for p, names, fn in patterns if (m := p.match(key))), None)
        if match is None:
            problems.append(f"unexpected tensor {key}")
            continue
        m, names, fn = match
        layer = int(m.group(1)) if m.groups() else None
        if layer is not None and layer >= config.n_layers:
            problems.append(f"{key}: layer {layer}, but the config has {config.n_layers} layers")
            continue
        for name in names:
            seen.setdefault(name, set()).add(layer)
        work.append((key, names, fn, layer))
    for key, (names, _) in keymap.items():
        for name in _tuple(names):
            if "{i}" in key:
                absent = sorted(set(range(config.n_layers)) - seen.get(name, set()))
                if absent:
                    problems.append(f"missing tensor {key} for layers {_ranges(absent)}")
            elif name not in seen and name in expected:
                problems.append(f"missing tensor {key}")

    out: dict[str, np.ndarray] = {}
    if sink is None:
        def sink(name, layer, value):
            if layer is None:
                out[name] = value
                return
            if name not in out:
                out[name] = np.zeros(expected[name], value.dtype)
            out[name][layer] = value

    for key, names, fn, layer in _progress(work, progress):
        wants = [expected[n][1:] if layer is not None else expected[n] for n in names]
        raw = source.get(key)
        try:
            values = _tuple(fn(raw))
            if [v.shape for v in values] != wants:
                raise ValueError
        except ValueError:  # the tensor is not the size the config says
            problems.append(f"{key}: shape {tuple(raw.shape)} does not give the "
                            f"{' + '.join(map(str, wants))} the config needs")
            continue
        if not problems:  # after a problem, only check the rest
            for name, value in zip(names, values, strict=True):
                sink(name, layer, value if dtype is None else value.astype(dtype, copy=False))
        del raw, values
        source.release(key)
    _raise_if(problems, config, origin)
    return trees.unflatten(out) if out else None


def _progress(work: list, enabled: bool):
    if not enabled:
        return work
    from tqdm import tqdm

    return tqdm(work, desc="converting", unit="tensor", file=sys.stderr, dynamic_ncols=True,
                disable=None)  # None: only on a terminal


def _raise_if(problems: list[str], config: Config, origin: str) -> None:
    if problems:
        problems = list(dict.fromkeys(problems))  # a fused tensor names each of its parts once
        described = f" as {origin} describes it" if origin else ""
        raise ConversionError(f"{len(problems)} problem(s) converting to {type(config).__name__}"
                              f"{described}: " + "; ".join(problems))


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _ranges(xs: list[int]) -> str:
    return ", ".join(str(x) for x in xs) if len(xs) < 6 else f"{xs[0]}..{xs[-1]} ({len(xs)})"
