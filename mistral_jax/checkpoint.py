"""Checkpoint directories: `config.json` (transformers' format), the tokenizer file(s), and the
weights written by Orbax under `weights/` as a nested dict mirroring the model's attributes.

A checkpoint does not record the mesh it was saved from: `load(path, mesh=...)` restores every
weight straight into the sharding the rules give on that mesh.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from mistral_jax import models, sharding
from mistral_jax.configs import Config, from_hf_dict, to_hf_dict
from mistral_jax.decoder import Decoder
from mistral_jax.tokenizer import Tokenizer

WEIGHTS = "weights"


class CheckpointError(ValueError):
    """A directory that is not a checkpoint, or weights that do not fit its config."""


def save(model: Decoder, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` (config, tokenizer, weights) as a checkpoint directory, atomically."""
    weights = models.weights(model)
    if model.vocab_padded != model.config.vocab_size:  # checkpoints hold the real vocab only
        axes = models.logical_axes(model)
        weights = jax.jit(lambda w: models.resize_vocab(w, axes, model.config.vocab_size))(weights)
    return write(model.config, weights, path, tokenizer=model.tokenizer, overwrite=overwrite)


def write(config: Config, weights: dict, path: str | os.PathLike, *, tokenizer=None,
          overwrite: bool = False) -> Path:
    """Write a checkpoint from a config and a nested dict of arrays (numpy or jax).

    Everything goes to a temporary sibling directory first, renamed into place at the end, so an
    interrupted save never leaves a directory that looks like a checkpoint.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True or choose another path")
    check_weights(config, weights, str(path))
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(to_hf_dict(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / WEIGHTS, weights)
            ckptr.wait_until_finished()
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


class StreamingWriter:
    """Write a checkpoint one weight, or one layer of a stacked weight, at a time, so that memory
    holds a single tensor however large the model is (the converters use it).

    Orbax writes the checkpoint's metadata for the tree of weights (with one-element stand-ins);
    each weight is then created at its full shape as a zarr array, in the layout Orbax reads back
    with `use_ocdbt=False`, chunked by layer. Like `write`, everything goes to a temporary sibling
    directory renamed into place at the end; leaving the `with` block by an exception removes it,
    and a weight (or layer) never written is an error.
    """

    def __init__(self, config: Config, path: str | os.PathLike, *, tokenizer=None,
                 overwrite: bool = False):
        self.config, self.tokenizer = config, tokenizer
        self.path = Path(path).absolute()
        if self.path.exists() and not overwrite:
            raise CheckpointError(
                f"{self.path} already exists; pass overwrite=True or choose another path")
        self.shapes = {k: tuple(v.shape) for k, v in
                       models.flatten(models.weights(models.abstract(config))).items()}
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.arrays: dict[str, ts.TensorStore] = {}
        self.written: dict[str, set] = {k: set() for k in self.shapes}

    def __enter__(self) -> StreamingWriter:
        self.tmp.mkdir(parents=True)
        (self.tmp / "config.json").write_text(json.dumps(to_hf_dict(self.config), indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save(self.tmp)
        stand_ins = models.unflatten({k: np.zeros((1,) * len(s), np.float32)
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

    def put(self, name: str, value: np.ndarray, layer: int | None = None) -> None:
        """Write weight `name` (our flattened name, e.g. "layers.q"), or its slice `layer`."""
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

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                layers = set(range(self.config.n_layers))
                absent = [k for k, got in self.written.items()
                          if got != (layers if k.startswith("layers.") else {None})]
                if absent:
                    raise CheckpointError(f"{self.path}: never written: " + ", ".join(absent))
                if self.path.exists():
                    shutil.rmtree(self.path)
                self.tmp.rename(self.path)
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)


CHUNK_BYTES = 32 << 20  # weights are stored (and written) in chunks of about this size


def read_config(path: str | os.PathLike) -> Config:
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_dir():
        raise CheckpointError(f"{path} is not a mistral_jax checkpoint (needs config.json and "
                              f"{WEIGHTS}/); convert a torch checkpoint with "
                              "`python -m convert.from_torch SRC OUT`")
    return from_hf_dict(json.loads((path / "config.json").read_text()))


def load(path: str | os.PathLike, *, mesh=None, dtype=None, sequence_parallel=False) -> Decoder:
    """The model in `path`, its weights cast to `dtype` (default: as saved).

    With `mesh`, each weight is restored directly into its `NamedSharding` from the sharding
    rules (no device holds a full copy of a sharded weight), the vocab padded where the model axis
    needs it; `sequence_parallel` as in `sharding.shard`.
    """
    path = Path(path).absolute()
    config = read_config(path)
    tokenizer = Tokenizer.from_dir(path)
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path / WEIGHTS).item_metadata.tree
        stored = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
        check_weights(config, stored, str(path))
        abstract = models.abstract(config, tokenizer=tokenizer)
        padded = config.vocab_size
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, stored)
        else:
            padded = sharding.padded_vocab_size(config.vocab_size, mesh.shape[sharding.MODEL])
            shard_as = sharding.vocab_shardings if padded > config.vocab_size else \
                sharding.weight_shardings
            shardings = shard_as(abstract, mesh)
        target = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh),
            stored, shardings)
        tree = ckptr.restore(path / WEIGHTS, target)
    model = models.with_weights(abstract, tree)
    if padded > config.vocab_size:
        model = sharding.shard(model, mesh, donate=True)
    model.rules = sharding.SEQUENCE_PARALLEL_RULES if sequence_parallel else sharding.RULES
    return model


def check_weights(config: Config, tree: dict, where: str) -> None:
    """Raise one error listing every missing, unexpected or mis-shaped weight for `config`."""
    expected = models.flatten(models.weights(models.abstract(config)))
    got = models.flatten(tree)
    problems = [f"missing {k} {tuple(s.shape)}" for k, s in expected.items() if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [f"{k}: shape {tuple(got[k].shape)}, config needs {tuple(s.shape)}"
                 for k, s in expected.items() if k in got and tuple(got[k].shape) != s.shape]
    if problems:
        raise CheckpointError(f"{where}: weights do not match its config: " + "; ".join(problems))
