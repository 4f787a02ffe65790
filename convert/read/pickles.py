"""Reading torch pickles (`.pt`, `.pth`, `.bin`) without running anything they contain.

A torch checkpoint is a pickle, and a pickle may name any function to call while it loads.
`load_torch` goes through torch's `weights_only` unpickler, which only builds tensors and plain
containers, and allows on top of that only what a Megatron checkpoint legitimately holds:
`args` (an `argparse.Namespace`, whose values may be torch dtypes and Megatron enums), the numpy
arrays and dtypes of the saved `rng_state`, and Transformer Engine's `_extra_state` buffers
(`io.BytesIO`). Megatron is not imported: its enums are read into a stand-in that keeps their
value. A pickle that asks for anything else is refused before it runs, naming what it asked for.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import numpy.dtypes
import torch

from convert.read.errors import ConversionError, listed


class MegatronEnum:
    """Stands in for a member of a Megatron enum (`ModelType`, `AttnMaskType`...) in `args`."""

    def __init__(self, value=None):
        self.value = value

    def __repr__(self) -> str:
        return f"MegatronEnum({self.value!r})"


_ENUM_MODULES = ("megatron.enums", "megatron.model.enums", "megatron.legacy.model.enums",
                 "megatron.core.enums", "megatron.core.transformer.enums")
_ENUM_NAMES = ("ModelType", "AttnMaskType", "AttnType", "LayerType", "PositionEmbeddingType",
               "AttnBackend")
_MEGATRON_ENUM = re.compile(r"megatron(\.\w+)*\.enums\.\w+$")  # any enum module of Megatron's


def _numpy_globals() -> list:
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else \
        np.core.multiarray._reconstruct
    dtypes = [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    return [(reconstruct, "numpy.core.multiarray._reconstruct"),  # pickled by numpy 1.x
            (reconstruct, "numpy._core.multiarray._reconstruct"),  # and by numpy 2.x
            np.ndarray, np.dtype, *dtypes]


ALLOWED = [
    argparse.Namespace,
    io.BytesIO,  # Transformer Engine's _extra_state; a BytesIO only holds bytes
    *_numpy_globals(),
    *[(MegatronEnum, f"{m}.{n}") for m in _ENUM_MODULES for n in _ENUM_NAMES],
]


def load_torch(path: str | Path, *, mmap: bool = True, where: str | None = None):
    """The object saved by `torch.save` in `path`, on CPU, storages memory-mapped when the file is
    in torch's zip format (legacy pickles are read into memory). Raises `ConversionError` naming
    `where` (default: `path`) for a file that is not a torch checkpoint or that asks for a global
    outside `ALLOWED`."""
    path, name = Path(path), where or str(path)
    if not path.is_file():
        raise ConversionError(f"{name}: no such file")
    allowed = list(ALLOWED)
    is_zip = zipfile.is_zipfile(path)
    if is_zip:  # read the pickle's globals first, without running it, to name every refusal
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:
            raise ConversionError(f"{name}: cannot read as a torch checkpoint: {e}") from e
        known = {_name(g) for g in ALLOWED}
        allowed += [(MegatronEnum, g) for g in wanted if _MEGATRON_ENUM.match(g)]
        refused = [g for g in wanted if g not in known and not _MEGATRON_ENUM.match(g)]
        if refused:
            raise _refusal(name, refused)
    for _ in range(len(_ENUM_NAMES) + 2):  # a legacy pickle names its globals one at a time
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True,
                                  mmap=mmap and is_zip)
        except pickle.UnpicklingError as e:
            refused = re.findall(r"GLOBAL ([\w.]+)", str(e))
            if not refused:
                raise ConversionError(f"{name}: cannot read as a torch checkpoint: "
                                              f"{_first_line(e)}") from None
            if not all(_MEGATRON_ENUM.match(g) for g in refused):
                raise _refusal(name, refused) from None
            allowed += [(MegatronEnum, g) for g in refused]
        except Exception as e:  # truncated or corrupt: torch raises RuntimeError, EOFError...
            raise ConversionError(f"{name}: cannot read as a torch checkpoint "
                                          f"(truncated or corrupt?): {_first_line(e)}") from None
    raise _refusal(name, refused)


def _name(g) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


def _refusal(where: str, names: list[str]) -> ConversionError:
    return listed(
        f"{where}: refused to load: the pickle asks for {', '.join(sorted(set(names)))}, which a "
        "model checkpoint has no reason to hold; nothing in the file was run",
        ["(allowed: tensors, argparse.Namespace args, numpy rng state, Megatron enums)"])


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
