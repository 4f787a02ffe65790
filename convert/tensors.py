"""Reading torch-side tensors one at a time and mapping them onto our weights through a key map.

A key map is `{torch key (with "{i}" for the layer index): (our name or names, transform)}`.
`convert_tensors` applies it, stacks per-layer tensors on the `layers` axis, checks every shape
against the model the config describes, and reports every problem at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from mistral_jax import models
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
    """Named tensors read lazily from safetensors files (memory-mapped) or torch pickles.

    Other sources (merged tensor-parallel shards, GGUF files) subclass it and override `keys` and
    `get`; `get` returns one tensor as numpy and is called once per key.
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
                return cls(files)
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
        if isinstance(handle, dict):
            return to_numpy(handle[key])
        return to_numpy(handle.get_tensor(key))

    def _handle(self, f: Path):
        if f not in self._open:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[f] = safe_open(f, framework="pt")
            else:
                try:
                    self._open[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:
                    raise ConversionError(f"{f}: cannot read as a torch checkpoint: {e}") from e
        return self._open[f]


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

    def weights(self, dtype=None) -> dict:
        """Every weight in memory as a nested dict of numpy arrays (tests, small models)."""
        return convert_tensors(self.source, self.keymap, self.config, ignore=self.ignore,
                               dtype=dtype)


def _pattern(key: str) -> re.Pattern:
    return re.compile(re.escape(key).replace(r"\{i\}", r"(\d+)") + "$")


def convert_tensors(
    source: TensorSource, keymap: KeyMap, config: Config, *, ignore=(), dtype=None
) -> dict:
    """Our nested weight dict from `source` via `keymap`; every problem is reported at once."""
    expected = {
        k: v.shape for k, v in models.flatten(models.weights(models.abstract(config))).items()
    }
    patterns = [(_pattern(k), _tuple(names), fn) for k, (names, fn) in keymap.items()]
    out: dict[str, np.ndarray] = {}
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
        wants = [expected[n][1:] if layer is not None else expected[n] for n in names]
        raw = source.get(key)
        try:
            values = _tuple(fn(raw))
            if [v.shape for v in values] != wants:
                raise ValueError
        except ValueError:  # the tensor is not the size the config says
            problems.append(
                f"{key}: shape {tuple(raw.shape)} does not give the "
                f"{' + '.join(map(str, wants))} the config needs"
            )
            continue
        for name, value in zip(names, values, strict=True):
            value = value.astype(dtype or value.dtype)
            if layer is None:
                out[name] = value
            else:
                if name not in out:
                    out[name] = np.zeros(expected[name], value.dtype)
                out[name][layer] = value
    for key, (names, _) in keymap.items():
        for name in _tuple(names):
            if "{i}" in key:
                absent = sorted(set(range(config.n_layers)) - seen.get(name, set()))
                if absent:
                    problems.append(f"missing tensor {key} for layers {_ranges(absent)}")
            elif name not in seen and name in expected:
                problems.append(f"missing tensor {key}")
    if problems:
        problems = list(dict.fromkeys(problems))  # a fused tensor names each of its parts once
        raise ConversionError(
            f"{len(problems)} problem(s) converting to {type(config).__name__}: "
            + "; ".join(problems)
        )
    return models.unflatten(out)


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _ranges(xs: list[int]) -> str:
    return ", ".join(str(x) for x in xs) if len(xs) < 6 else f"{xs[0]}..{xs[-1]} ({len(xs)})"
