"""Named tensors read lazily, one at a time: from safetensors files, torch pickles, and (in the
format modules, by subclassing `TensorSource`) merged shards and GGUF files.

Reading one tensor at a time keeps peak memory near the largest tensor, not the model.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

from convert.read.errors import ConversionError, listed

if TYPE_CHECKING:  # torch is imported where a torch pickle is read, not here: a safetensors or
    import torch  # GGUF conversion starts without it (seconds of every from_torch run)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy, bfloat16 kept as ml_dtypes.bfloat16 (numpy has no bfloat16)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TensorSource:
    """Named tensors read lazily, one at a time, from safetensors files or torch pickles.

    A safetensors tensor is read from its offset when asked for, so memory holds one tensor at a
    time. A torch pickle goes through `convert.read.pickles.load_torch` (memory-mapped when the file
    is in torch's zip format); `release(key)` hands a mapped tensor's pages back once it has been
    converted. Other sources (merged tensor-parallel shards, GGUF files)
    subclass this and override `keys` and `get` (and `release` if they hold memory).
    """

    def __init__(self, files_by_key: dict[str, Path]):
        self.files_by_key = files_by_key
        self._open: dict[Path, object] = {}

    def int8_block_size(self, key: str) -> int | None:
        """The block size of a tensor stored as int8 blocks (GGUF's Q8_0), else None; read
        from the header only."""
        return None

    def int8_blocks(self, key: str) -> tuple[np.ndarray, np.ndarray, int] | None:
        """A tensor stored as int8 blocks (GGUF's Q8_0): (its int8 values, each value's block
        scale, float32, both shaped as `get` gives the tensor, the block size); None if not."""
        return None

    @classmethod
    def from_hf_folder(cls, path: Path) -> TensorSource:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                weight_map = json.loads((path / index).read_text())["weight_map"]
                files = {k: path / f for k, f in weight_map.items()}
                missing = sorted({str(f) for f in files.values() if not f.is_file()})
                if missing:
                    raise listed(f"{path / index} names {len(missing)} shard(s) that are absent; "
                                 "copy them in beside it:", missing)
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
        if isinstance(handle, dict):  # a torch pickle's tensors
            import torch

            from convert.read import pages

            if isinstance(handle.get(key), torch.Tensor):
                pages.release_tensor(handle[key])

    def _handle(self, f: Path):
        if f not in self._open:
            if f.suffix == ".safetensors":
                self._open[f] = SafetensorsFile(f)
            else:
                from convert.read.pickles import load_torch

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
