"""Handing the pages of a memory-mapped tensor back to the kernel once it has been converted.

A memory-mapped checkpoint (`torch.load(mmap=True)`, a GGUF file) keeps every page it has read
counted in the process's memory until the mapping goes. `madvise(MADV_DONTNEED)` drops them
early; they stay readable (read again from the file if touched). Only a mapping of a file may be
told so: on anonymous memory (a legacy pickle read into memory) the same call zeroes the data.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (a tensor is handed in: the caller has torch loaded)
    import torch

MADVISE_MIN = 1 << 20  # small tensors share pages with their neighbours; leave them
MADV_DONTNEED = 4  # Linux's value


def release(address: int, nbytes: int) -> None:
    """Drop the pages under [address, address + nbytes) when they belong to a mapped file (the
    range is widened down to its first page and cut to the mapping); elsewhere do nothing."""
    mapping = file_mapping(address)
    if mapping is None:
        return
    begin = max(address // mmap.PAGESIZE * mmap.PAGESIZE, mapping[0])
    end = min(address + nbytes, mapping[1])
    _libc().madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), MADV_DONTNEED)


def release_tensor(t: torch.Tensor) -> None:
    """`release` the storage under a torch tensor, unless it is smaller than `MADVISE_MIN`."""
    storage = t.untyped_storage()
    if storage.nbytes() >= MADVISE_MIN:
        release(storage.data_ptr(), storage.nbytes())


def file_mapping(address: int) -> tuple[int, int] | None:
    """The [start, end) of the mapping of a file that holds `address`, from /proc/self/maps;
    None for anonymous memory, or where there is no /proc (not Linux)."""
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


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)
