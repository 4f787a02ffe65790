"""The key-map engine: one table per format, walked one way to import and the other to export.

A key map is `{torch key (with "{i}" for the layer index): (our name or names, Layout)}` (see
convert/mapping/layouts.py). `convert_tensors` applies it to a source one tensor at a time,
checks every shape against the model the config describes, hands each weight (or layer of a
stacked weight) to a sink, and reports every problem at once (bonsai's converters do the same).
`torch_tensors` walks the same table back, from our weights to torch's state dict, as levanter
does with its one map. A format whose tensors are another's under other names renames that
format's table (`renamed`) instead of writing a second one.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable

import numpy as np

from convert.mapping.layouts import Layout
from convert.read.errors import ConversionError, listed
from convert.read.sources import TensorSource
from mistral_jax.arch import weights
from mistral_jax.arch.configs import Config, model_type
from mistral_jax.base import trees
from mistral_jax.model import registry as models
from mistral_jax.quant import int8 as quant

KeyMap = dict[str, tuple[str | tuple[str, ...], Layout]]
Sink = Callable[[str, int | None, np.ndarray], None]  # (our name, layer or None, value)


def key_pattern(key: str) -> re.Pattern:
    """A key map's key ("{i}" for the layer index) as a regex that captures the layer."""
    return re.compile(re.escape(key).replace(r"\{i\}", r"(\d+)") + "$")


def renamed(keymap: KeyMap, names: dict[str, str],
            first: dict[str, Layout] | None = None) -> KeyMap:
    """`keymap` under another format's keys: `names` maps each of them onto `keymap`'s, in the
    order given; a key in `first` goes through that layout before the entry's own (its
    format-specific step, such as RoPE's interleaved pairs)."""
    out = {}
    for key, theirs in names.items():
        ours, layout = keymap[theirs]
        out[key] = (ours, layout.after(first[key]) if first and key in first else layout)
    return out


def keymap_target(keymap: KeyMap, key: str) -> str | None:
    """Our one weight that the source tensor `key` becomes (None: none, or several)."""
    for k, (names, _) in keymap.items():
        if key_pattern(k).match(key):
            return names if isinstance(names, str) else None
    return None


def convert_tensors(source: TensorSource, keymap: KeyMap, config: Config, *, ignore=(),
                    dtype=None, sink: Sink | None = None, progress: bool = False,
                    origin: str = "", quantized=()) -> dict | None:
    """Map every tensor of `source` through `keymap` onto the weights `config` describes.

    The keys are checked first (unexpected, missing, layers beyond the config); then each tensor
    is read, transformed and shape-checked one at a time and handed to `sink(name, layer, value)`,
    or, without a sink, stacked into a nested dict that is returned. After the first problem the
    rest are only checked, so that one ConversionError reports every problem, its first line
    naming `origin` (the file the config came from) and the config field the sizes contradict
    (`Problems`). A weight named in `quantized` reaches the sink as the source's
    int8 blocks (`quant.QWeight`: its values and block scales through the same layout change).
    """
    expected = {
        k: v.shape for k, v in trees.flatten(trees.weights(models.abstract(config))).items()
    }
    patterns = [(key_pattern(k), k, _tuple(names), layout.to_ours)
                for k, (names, layout) in keymap.items()]
    work = []  # (source key, its key map key, our names, transform, layer)
    seen: dict[str, set] = {}  # our name -> layers (or {None}) a source tensor was found for
    problems = Problems()
    for key in source.keys():
        if key in ignore:
            continue
        match = next(((m, k, names, fn) for p, k, names, fn in patterns if (m := p.match(key))),
                     None)
        if match is None:
            problems.add(f"unexpected tensor {key}")
            continue
        m, template, names, fn = match
        layer = int(m.group(1)) if m.groups() else None
        problems.layers = max(problems.layers, -1 if layer is None else layer + 1)
        if layer is not None and layer >= config.n_layers:
            problems.past.append(layer)
            continue
        for name in names:
            seen.setdefault(name, set()).add(layer)
        work.append((key, template, names, fn, layer))
    for key, (names, _) in keymap.items():
        for name in _tuple(names):
            if "{i}" in key:
                absent = sorted(set(range(config.n_layers)) - seen.get(name, set()))
                if absent:
                    problems.add(f"missing tensor {key} for layers {_ranges(absent)}")
            elif name not in seen and name in expected:
                problems.add(f"missing tensor {key}")

    out: dict[str, np.ndarray] = {}
    if sink is None:
        def sink(name, layer, value):
            if layer is None:
                out[name] = value
                return
            if name not in out:
                out[name] = np.zeros(expected[name], value.dtype)
            out[name][layer] = value

    for key, template, names, fn, layer in _progress(work, progress):
        wants = [expected[n][1:] if layer is not None else expected[n] for n in names]
        int8 = len(names) == 1 and names[0] in quantized
        values, shape = _read(source, key, fn, names[0] if int8 else None, config)
        got = None if values is None else [
            v.values.shape if isinstance(v, quant.QWeight) else v.shape for v in values]
        if got != wants:  # the tensor is not the size the config says
            wanted = f"{len(wants)} x {wants[0]}" if len(set(wants)) == 1 < len(wants) \
                else " + ".join(map(str, wants))  # GPT-2's q|k|v: 3 x the same
            problems.add(f"its int8 blocks cannot give the config's {wanted}" if int8
                         else f"shape {shape} cannot give the config's {wanted}", template, layer)
            for name, g in zip(names, got or (), strict=False):
                problems.shapes.setdefault(name, (g, layer is not None))
        elif not problems:  # after a problem, only check the rest
            for name, value in zip(names, values, strict=True):
                sink(name, layer, value if int8 or dtype is None
                     else value.astype(dtype, copy=False))
        del values
        source.release(key)  # after the sink: a value may still be a view of its pages
    if problems:
        raise problems.error(config, expected, origin)
    return trees.unflatten(out) if out else None


class Problems:
    """What `convert_tensors` found wrong, to be raised once: one line per problem, the layers
    of a stacked weight that share a problem on one line, and what the first line says."""

    def __init__(self):
        self.lines: dict[tuple[str, str], list] = {}  # (key map key, problem) -> layers
        self.layers = 0  # the layers the source's keys number
        self.shapes: dict[str, tuple] = {}  # our name -> (shape it came to, stacked)
        self.past: list[int] = []  # the layer of each tensor past the config's layers

    def __bool__(self) -> bool:
        return bool(self.lines or self.past)

    def add(self, problem: str, key: str = "", layer: int | None = None) -> None:
        self.lines.setdefault((key, problem), []).append(layer)

    def error(self, config: Config, expected: dict, origin: str) -> ConversionError:
        items = [f"{key.replace('{i}', _span(layers))}: {problem}" if key else problem
                 for (key, problem), layers in self.lines.items()]
        if self.past:
            layers = "layers" if len(set(self.past)) > 1 else "layer"
            items.insert(0, f"{len(self.past)} tensors of {layers} {_span(self.past)}, past the "
                         f"config's {config.n_layers} layers")
        items = list(dict.fromkeys(items))  # a fused tensor names each of its parts once
        fields = self._fields(config, expected)
        where = origin or f"the {type(config).__name__}"
        if fields:
            summary = f"{where} says {fields[0]}: fix it, or use these weights' own config"
            items = [f"it also says {f}" for f in fields[1:]] + items
        else:
            summary = f"{where} describes a model these weights do not fit: check they go together"
        return listed(summary, [f"{len(items)} problem(s) converting to "
                                f"{type(config).__name__}:"] + [f"  {i}" for i in items])

    def _fields(self, config: Config, expected: dict) -> list[str]:
        """`field N; the weights have M` for each config field the tensors' sizes contradict."""
        fields, named = [], {f.name for f in dataclasses.fields(config)}
        for field, (name, axis) in weights.sized_by(model_type(config)).items():
            if field not in named:  # a derived size (GPT-2's head_dim): no config.json field
                continue
            if axis == 0 and name.startswith("layers."):  # the layer count: from the keys
                if self.layers and self.layers != config.n_layers:
                    fields.append(f"{field} {config.n_layers}; the weights have {self.layers}")
                continue
            got, stacked = self.shapes.get(name, (None, False))
            axis -= stacked
            if got is not None and len(got) > axis \
                    and got[axis] != expected[name][axis + stacked]:
                fields.append(f"{field} {expected[name][axis + stacked]}; the weights have "
                              f"{got[axis]}")
        return fields


def _read(source: TensorSource, key: str, fn, int8: str | None,
          config: Config) -> tuple[tuple | None, tuple]:
    """`key`'s value(s) in our layout, and its shape in the source; None for the values when the
    layout cannot reshape the tensor (it is not the size the config says). `int8`: the weight
    of ours whose int8 blocks it is read as."""
    if int8 is not None:
        blocks = _int8_blocks(source, key, fn, int8, config)
        return (None if blocks is None else (blocks,)), ()
    raw = source.get(key)
    try:
        return _tuple(fn(raw)), tuple(raw.shape)
    except ValueError:  # numpy's: a reshape that the tensor's size does not allow
        return None, tuple(raw.shape)


def _int8_blocks(source: TensorSource, key: str, fn, name: str, config: Config):
    """`key`'s int8 values and block scales in our layout: the values and a per-value copy of
    the scales go through the layout change, then each block's scale is read back once (None
    when the layout cannot reshape them, or the blocks do not lie along the weight's input)."""
    values, scales, block = source.int8_blocks(key)
    try:
        values, scales = fn(values), fn(scales)
        layout, n_in = quant.table(config)[name]
        k = quant.input_size(values.shape, 0, n_in, layout)
        grouped, axis = quant.grouped_shape(values.shape, 0, n_in, layout, k // block)
        scales = scales.reshape(grouped)
    except ValueError:  # numpy's: a reshape that the tensor's size does not allow
        return None
    per_block = np.take(scales, 0, axis=axis)
    if not np.array_equal(scales, np.expand_dims(per_block, axis).repeat(block, axis)):
        return None
    return quant.QWeight(np.ascontiguousarray(values), per_block.astype(np.float32))


def torch_tensors(keymap: KeyMap, config: Config, weights: dict) -> dict[str, np.ndarray]:
    """`keymap` walked back: torch's {key: array} from our nested dict of weights (layers
    stacked). A weight that is absent or None (a head tied to the embedding) is left out."""
    flat = trees.flatten(weights)
    out = {}
    for key, (names, layout) in keymap.items():
        names = _tuple(names)
        if any(flat.get(n) is None for n in names):
            continue
        layers = range(config.n_layers) if "{i}" in key else [None]
        for i in layers:
            values = tuple(flat[n] if i is None else flat[n][i] for n in names)
            out[key.replace("{i}", str(i))] = layout.to_torch(
                values if len(names) > 1 else values[0])
    return out


def _progress(work: list, enabled: bool):
    if not enabled:
        return work
    from tqdm import tqdm

    return tqdm(work, desc="converting", unit="tensor", file=sys.stderr, dynamic_ncols=True,
                disable=None)  # None: only on a terminal


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _span(layers: list) -> str:
    """The layers a stacked weight's key stands for: `3`, `{0..11}`, `{0,2,5}` (None: no layer,
    the key is left as it is)."""
    if layers == [None]:
        return "{i}"
    xs = sorted(set(layers))
    if len(xs) == 1:
        return str(xs[0])
    if xs == list(range(xs[0], xs[-1] + 1)):
        return f"{{{xs[0]}..{xs[-1]}}}"
    return "{" + ",".join(map(str, xs if len(xs) < 6 else [*xs[:2], "...", xs[-1]])) + "}"


def _ranges(xs: list[int]) -> str:
    return ", ".join(str(x) for x in xs) if len(xs) < 6 else f"{xs[0]}..{xs[-1]} ({len(xs)})"
