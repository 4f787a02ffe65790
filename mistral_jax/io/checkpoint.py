"""Checkpoint directories: `config.json` (transformers' format), the tokenizer file(s), and the
weights written by Orbax under `weights/` as a nested dict mirroring the model's attributes.

A checkpoint does not record the mesh it was saved from: `load(path, mesh=...)` restores every
weight straight into the sharding the rules give on that mesh. Every directory is written whole
or not at all (see `files.atomic_directory`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from mistral_jax.arch import weights
from mistral_jax.arch.configs import Config, model_type
from mistral_jax.base import trees
from mistral_jax.io import files, lora
from mistral_jax.io.files import WEIGHTS
from mistral_jax.model import registry as models
from mistral_jax.model.decoder import Decoder
from mistral_jax.model.options import Options
from mistral_jax.nn import adapters as nn_adapters
from mistral_jax.parallel.placement import onto, place
from mistral_jax.quant import int8 as quant
from mistral_jax.text.tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A directory that is not a checkpoint, or weights that do not fit its config."""


def save(model: Decoder, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` (config, tokenizer, weights) as a checkpoint directory, atomically.
    Every process of a multi-process run calls it; each writes the shards it holds."""
    if nn_adapters.attached(model) is not None:
        raise CheckpointError(f"{path}: this model carries LoRA adapters beside its weights "
                              "(unmerged, as over an int8 base), which a checkpoint does not "
                              "hold: keep them as an adapters directory (--adapters DIR), or "
                              "merge them into the float checkpoint (python -m "
                              "train.merge_lora FLOAT ADAPTERS OUT)")
    weights = trees.weights(model)
    if model.vocab_padded != model.config.vocab_size:  # checkpoints hold the real vocab only
        axes = trees.logical_axes(model)
        weights = jax.jit(lambda w: trees.resize_vocab(w, axes, model.config.vocab_size))(weights)
    weights = trees.unflatten(quant.stored(trees.flatten(weights)))
    return write(model.config, weights, path, tokenizer=model.tokenizer, overwrite=overwrite)


def write(config: Config, weights: dict, path: str | os.PathLike, *, tokenizer=None,
          overwrite: bool = False) -> Path:
    """Write a checkpoint from a config and a nested dict of arrays (numpy or jax)."""
    path = files.check_new(path, overwrite)
    check_weights(config, weights, str(path))
    with files.atomic_directory(path, overwrite=overwrite) as tmp:
        files.write_config(tmp, config, tokenizer)
        files.write_arrays(tmp / WEIGHTS, weights)
    return path


class StreamingWriter:
    """Write a checkpoint one weight, or one layer of a stacked weight, at a time, so that memory
    holds a single tensor however large the model is (the converters use it).

    Orbax writes the checkpoint's metadata for the tree of weights (with one-element stand-ins);
    each weight is then created at its full shape as a zarr array, in the layout Orbax reads back
    with `use_ocdbt=False`, chunked by layer. Leaving the `with` block by an exception leaves
    nothing behind, and a weight (or layer) never written is an error.
    """

    def __init__(self, config: Config, path: str | os.PathLike, *, tokenizer=None,
                 overwrite: bool = False, quantize: str | None = None, groups: dict | None = None):
        """`quantize="int8"`: each matmul weight is written as int8 and its scales, one scale per
        output channel, or per group where `groups` ({name: G}) says; a `put` of a
        `quant.QWeight` writes weights quantized already (GGUF's Q8_0) as they are."""
        self.config, self.tokenizer, self.overwrite = config, tokenizer, overwrite
        self.path = files.check_new(path, overwrite)
        quant.check_method(quantize)
        abstract = models.abstract(config)
        self.kinds = quant.table(config) if quantize else {}
        if quantize:
            names = trees.flatten(trees.weights(abstract))
            self.groups = {k: (groups or {}).get(k, 1) for k in self.kinds if k in names}
            abstract = quant.restructure(abstract, self.groups)
        self.shapes = {k: tuple(v.shape) for k, v in
                       quant.stored(trees.flatten(trees.weights(abstract))).items()}
        self.arrays: dict[str, ts.TensorStore] = {}
        self.written: dict[str, set] = {k: set() for k in self.shapes}

    def __enter__(self) -> StreamingWriter:
        self._directory = files.atomic_directory(self.path, overwrite=self.overwrite)
        self.tmp = self._directory.__enter__()
        files.write_config(self.tmp, self.config, self.tokenizer)
        stand_ins = trees.unflatten({k: np.zeros((1,) * len(s), np.float32)
                                      for k, s in self.shapes.items()})
        absl = logging.getLogger("absl")  # quiet Orbax's note that there is no OCDBT to merge
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as ckptr:
                ckptr.save(self.tmp / WEIGHTS, args=ocp.args.PyTreeSave(stand_ins))
        finally:
            absl.setLevel(level)
        return self

    def put(self, name: str, value, layer: int | None = None) -> None:
        """Write weight `name` (our flattened name, e.g. "layers.q"), or its slice `layer`."""
        if name in self.kinds:
            layout, n_in = self.kinds[name]
            if not isinstance(value, quant.QWeight):
                k = quant.input_size(value.shape, 0, n_in, layout)
                value = quant.QWeight(*quant.quantize(np.asarray(value), 0, n_in, layout,
                                                      k // self.groups[name]))
            self._put(name + quant.SCALE, np.asarray(value.scale, np.float32), layer)
            value = value.values
        self._put(name, value, layer)

    def _put(self, name: str, value: np.ndarray, layer: int | None) -> None:
        shape = self.shapes[name]
        want = shape if layer is None else shape[1:]
        if tuple(value.shape) != want:
            raise CheckpointError(f"{name}: shape {tuple(value.shape)}, the config needs {want}")
        if name not in self.arrays:
            self.arrays[name] = self._create(name, shape, value.dtype, stacked=layer is not None)
        target = self.arrays[name] if layer is None else self.arrays[name][layer]
        if value.ndim == 0:
            target.write(value).result()
        rows = target.chunk_layout.read_chunk.shape[0] if value.ndim else 0
        for start in range(0, len(value) if value.ndim else 0, rows):
            # a chunk at a time: tensorstore holds one chunk's copy, not the tensor's
            stop = min(start + rows, len(value))
            target[start:stop].write(value[start:stop]).result()
        self.written[name].add(layer)

    def _create(self, name: str, shape: tuple, dtype, stacked: bool) -> ts.TensorStore:
        """A zarr array chunked by layer, and within that by rows of about CHUNK_BYTES."""
        inner = shape[1:] if stacked else shape
        row = np.dtype(dtype).itemsize * math.prod(inner[1:])
        chunks = (*(1,) * stacked, max(1, min(inner[0], CHUNK_BYTES // max(row, 1))), *inner[1:])
        spec = {"driver": "zarr",
                "kvstore": {"driver": "file", "path": str(self.tmp / WEIGHTS / name)},
                # one copying thread: each extra one keeps its own malloc arena of freed chunks
                "context": {"data_copy_concurrency": {"limit": 1}},
                "metadata": {"compressor": {"id": "zstd", "level": 1}, "chunks": list(chunks)}}
        return ts.open(spec, create=True, delete_existing=True, dtype=ts.dtype(np.dtype(dtype)),
                       shape=shape).result()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            layers = set(range(self.config.n_layers))
            absent = [k for k, got in self.written.items()
                      if got != (layers if k.startswith("layers.") else {None})]
            if absent:
                error = CheckpointError(f"{self.path}: never written: " + ", ".join(absent))
                self._directory.__exit__(CheckpointError, error, None)  # removes it
                raise error
        return self._directory.__exit__(exc_type, exc, tb)


CHUNK_BYTES = 32 << 20  # weights are stored (and written) in chunks of about this size


def read_config(path: str | os.PathLike) -> Config:
    """The config of the checkpoint `path`; a path that is not one gets an error that says
    what it is and what to do."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_dir():
        raise CheckpointError(not_a_checkpoint(path))
    return files.read_config(path, CheckpointError)


def is_quantized(path: str | os.PathLike) -> bool:
    """Whether the checkpoint `path` holds int8 weights (`convert.from_torch --quantize`)."""
    stored = trees.flatten(files.stored_shapes(Path(path) / WEIGHTS))
    return bool(quant.group_counts(stored, quant.table(read_config(path))))


def not_a_checkpoint(path: Path) -> str:
    """What `path` (which exists) is instead of a checkpoint, and the command that converts."""
    kind = None
    if path.is_file() and path.suffix == ".gguf":
        kind = "a GGUF file"
    elif path.is_file() and path.suffix in (".zip", ".pt"):
        kind = "a Megatron-LM checkpoint file"
    elif path.is_file() and path.suffix == ".safetensors":
        kind = "a safetensors file (convert the folder that holds it with its config.json)"
    elif path.is_dir() and (path / "params.json").is_file():
        kind = "Mistral's original release"
    elif path.is_dir() and (path / "config.json").is_file() and any(
            path.glob("*.safetensors*")) or any(path.glob("pytorch_model.bin*")):
        kind = "a Hugging Face model folder"
    elif path.is_dir() and ((path / "latest_checkpointed_iteration.txt").is_file()
                            or any(path.glob("mp_rank_*"))):
        kind = "a Megatron-LM checkpoint directory"
    if kind is None:
        return (f"{path} is not a mistral_jax checkpoint (it needs config.json and {WEIGHTS}/); "
                "convert a torch checkpoint with `python -m convert.from_torch SRC OUT`")
    target = path.parent / f"{path.stem if path.is_file() else path.name}-jax"
    return (f"{path} is {kind}, not a mistral_jax checkpoint; convert it first: "
            f"python -m convert.from_torch {path} {target}")


def load(path: str | os.PathLike, *, mesh=None, dtype=None, adapters=None,
         sequence_parallel=False, attention: str = "auto", quantize: str | None = None,
         kv_cache_dtype: str | None = None, options: Options | None = None) -> Decoder:
    """The model in `path`, its float weights cast to `dtype` (default: as saved).

    With `mesh`, each weight is restored directly into its `NamedSharding` from the sharding
    rules (no device holds a full copy of a sharded weight), the vocab padded where the model axis
    needs it; `adapters`, a LoRA adapters directory (train.finetune's OUT/adapters), is merged
    into float weights, and kept beside int8 ones (see `nn.adapters`); `quantize="int8"`
    quantizes the matmul weights (see `quant`) after the adapters are merged. A checkpoint
    saved quantized loads quantized.

    How the model runs is its `options` (`model.options.Options`): given whole, or by the
    shortcuts `sequence_parallel` (as in `registry.shard`), `attention` (an
    `attention.IMPLEMENTATIONS` name) and `kv_cache_dtype` ("int8", "bfloat16", "float32";
    default: the compute dtype), the KV cache's in generation and serving.
    """
    quant.check_method(quantize)
    if options is None:
        options = Options(attention=attention, kv_cache_dtype=kv_cache_dtype,
                          sequence_parallel=sequence_parallel)
    config = read_config(path)
    try:
        tokenizer = Tokenizer.from_dir(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: its tokenizer cannot be read: {e}") from None
    stored = files.stored_shapes(Path(path) / WEIGHTS)
    abstract = models.abstract(config, tokenizer=tokenizer, options=options)
    kinds = quant.table(config)
    check_weights(config, stored, str(path), abstract, kinds)
    groups = quant.group_counts(trees.flatten(stored), kinds)
    if groups:
        abstract = quant.restructure(abstract, groups)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings, placement = jax.tree.map(lambda _: device, stored), None
    else:
        placement = place(abstract, mesh)
        shardings = trees.unflatten(quant.stored(trees.flatten(placement.incoming)))
    cast = lambda s: s.dtype if dtype is None or s.dtype == np.int8 else dtype  # noqa: E731
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, cast(s), sharding=sh),
                          stored, shardings)
    if groups:  # scales stay float32
        flat = trees.flatten(target)
        flat.update({k: jax.ShapeDtypeStruct(v.shape, np.float32, sharding=v.sharding)
                     for k, v in flat.items() if k[:-len(quant.SCALE)] in groups})
        target = trees.unflatten(flat)
    arrays = trees.flatten(files.read_arrays(Path(path) / WEIGHTS, target))
    model = trees.with_weights(abstract, trees.unflatten(quant.in_memory(arrays, groups)))
    if placement is not None and placement.vocab_padded > config.vocab_size:
        model = onto(model, placement, donate=True)
    if adapters is not None:
        model = lora.apply(model, adapters)
    if quantize is not None:
        model = quant.quantized(model)
    return model


def check_weights(config: Config, tree: dict, where: str, abstract=None,
                  kinds: dict | None = None) -> None:
    """Raise one error for every missing, unexpected or mis-shaped weight for `config`: first a
    line naming the config fields the weights disagree with, then each tensor on its own line.
    (`abstract` and `kinds`: the model and quantization table, when the caller has them.)"""
    abstract = models.abstract(config) if abstract is None else abstract
    expected = trees.flatten(trees.weights(abstract))
    got = trees.flatten(tree)
    kinds = quant.table(config) if kinds is None else kinds
    scales = {k: got.pop(k) for k in list(got)
              if k.endswith(quant.SCALE) and k[:-len(quant.SCALE)] in kinds}
    problems = [f"missing {k} {tuple(s.shape)}" for k, s in expected.items() if k not in got]
    problems += [f"unexpected {k} {tuple(got[k].shape)}" for k in got if k not in expected]
    problems += [f"{k}: shape {tuple(got[k].shape)}, config needs {tuple(s.shape)}"
                 for k, s in expected.items() if k in got and tuple(got[k].shape) != s.shape]
    problems += quant.scale_problems(got, scales, kinds)
    if not problems:
        return
    fields = []
    named = {f.name for f in dataclasses.fields(config)}
    for field, (name, axis) in weights.sized_by(model_type(config)).items():
        if field in named and name in got and name in expected and len(got[name].shape) > axis \
                and got[name].shape[axis] != expected[name].shape[axis]:
            fields.append(f"{field} {expected[name].shape[axis]}; the weights have "
                          f"{got[name].shape[axis]}")
    if ("lm_head" in got) != ("lm_head" in expected):
        fields.append(f"tie_word_embeddings {str(config.tie_word_embeddings).lower()}; the "
                      f"weights {'have' if 'lm_head' in got else 'have no'} lm_head")
    summary = ("config.json says " + ", and ".join(fields)) if fields else \
        f"{len(problems)} weight(s) do not match config.json"
    raise CheckpointError(f"{where}: {summary}\n" + "\n".join(f"  {p}" for p in problems))
