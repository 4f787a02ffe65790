"""CPU kernels for decoding, as XLA FFI calls: a matmul for int8, bfloat16 and float32 weights at
small M (matmul.cc), decode attention that reads a KV cache where it lies (attention.cc), and a
lookup of embedding rows in place (`rows`).

Decoding reads every weight once per token, so it is bound by memory bandwidth. XLA:CPU has fast
kernels for float32 dots only: on a 2-core AMD EPYC (Zen 4) its float32 `x @ w` at M = 1 reads
weights at 20-30 GB/s, a bfloat16 `jnp.dot(x, w_bf16, preferred_element_type=f32)` at about 1
GB/s, int8 converted inside the jit slower still, so smaller weights made decoding slower.
`matmul` runs our kernel (matmul.cc) instead (float32 weights too: it reads a layer of a stacked
weight in place, where XLA copied the slice out first): it streams the weights once, widens them
to float32 in registers and accumulates in float32, so that halving (bf16) or quartering (int8)
the bytes read shortens the time: measured at M = 1 against float32 XLA on the same shapes, bf16
1.7-3x faster, int8 2.5-5x (per-column scales fastest, groups of 32 along K next). The kernel
grows compute bound with M: at M = 16 it is 1.0-2x faster than float32 XLA, at M = 32 about even
(0.9-1.4x); `reference` with bf16 or int8 weights is slower than the kernel at any M.

    matmul(x, w, scale=None, *, index=None, layout="kn") -> float32 [M, N]

x is [M, K] float32 (bfloat16 is cast); w is int8, bfloat16 or float32, [K, N] (layout "kn": x @ w)
or [N, K] (layout "nk": x @ w.T, e.g. a tied embedding table as the LM head). With `index`
(an int32 scalar, may be traced, e.g. a scan's counter) w is a stack [L, K, N] / [L, N, K]
and layer `index` is read in place; slicing it in XLA would copy the layer every step. An
index outside [0, L) is refused (a ValueError when it is a number; when traced, the kernel's
error at run time, where `reference`'s jnp indexing would clamp it). int8 needs `scale`,
float32, per group of K/G consecutive k: [G, N] (kn) or [N, G] (nk), with a leading L when
stacked; y[m, n] = sum_g scale[g, n] * sum_{k in group g} x[m, k] * w[k, n].

`attention` (see its docstring) and `rows` exist for the same reason: XLA:CPU copied each block
of a cache, and converted a whole 16-bit cache or embedding table to float32, every token.

The C++ sources (*.cc, sharing common.h; matmul.h holds the matmul's tiles) are compiled into
one library at first use with the system compiler (`CXX`, default g++) into
${MISTRAL_JAX_CACHE:-~/.cache/mistral_jax}/kernels/ and dispatches on CPU features at run time.
Where it cannot be used (no compiler, a failed build, not a CPU backend, an abstract mesh or
arrays over several devices) `matmul` is `reference`, the same product in plain jnp.
MISTRAL_JAX_CPU_KERNEL picks the path: auto (default, the best the CPU has), avx512, avx2,
scalar, or off (reference).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shlex
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

__all__ = ["WEIGHT_DTYPES", "attention", "available", "isa", "matmul", "reference", "rows"]

WEIGHT_DTYPES = ("int8", "bfloat16", "float32")  # the weights `matmul` reads

_SOURCES = sorted(Path(__file__).parent.glob("*.cc"))  # one library of them all
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))
_TARGET = "mistral_jax_matmul"
_ROWS = "mistral_jax_rows"
_ATTENTION = "mistral_jax_attention"
KV_TYPES = {"float32": 0, "bfloat16": 1, "float16": 2, "int8": 3}  # attention.cc's KvType
_ISA_CODES = {"auto": 0, "avx512": 1, "avx2": 2, "scalar": 3}
_ISA_NAMES = {1: "avx512", 2: "avx2", 3: "scalar"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_built_in = 0.0


def _mode() -> str:
    mode = os.environ.get("MISTRAL_JAX_CPU_KERNEL", "auto").strip().lower() or "auto"
    if mode not in (*_ISA_CODES, "off"):
        raise ValueError(f"MISTRAL_JAX_CPU_KERNEL={mode!r}: expected auto, avx512, avx2, "
                         "scalar or off")
    return mode


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "") or "g++")


def _library_path() -> Path:
    """Where the build of this source, compiler and jaxlib lives."""
    cxx = _compiler()
    try:
        version = subprocess.run([*cxx, "--version"], capture_output=True, text=True,
                                 check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"compiler {' '.join(cxx)!r} not usable ({e})") from None
    source = b"".join(path.read_bytes() for path in [*_SOURCES, *_HEADERS])
    key = hashlib.sha256(source + version.encode() + jaxlib.__version__.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MISTRAL_JAX_CACHE") or Path.home() / ".cache/mistral_jax")
    return cache / "kernels" / f"cpu-{key}.so"


def needs_build() -> bool:
    """Whether the first use of the kernel will compile it (once per machine; tens of
    seconds), rather than load it."""
    if _tried or _mode() == "off" or jax.default_backend() != "cpu":
        return False
    try:
        return not _library_path().exists()
    except RuntimeError:
        return False


def build_seconds() -> float:
    """Seconds this process spent compiling the kernel (0 when it was loaded, or not used)."""
    return _built_in


def _build() -> ctypes.CDLL:
    """Compiles the sources (once per source, compiler and jaxlib) and loads them."""
    global _built_in
    cxx, out = _compiler(), _library_path()
    if not out.exists():
        start = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem + "-", suffix=".tmp")
        os.close(fd)
        cmd = [*cxx, "-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-w",
               "-I", jax.ffi.include_dir(), *map(str, _SOURCES), "-o", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"compiler {' '.join(cxx)!r} failed on the kernels "
                                   f"(exit {proc.returncode}): {err}")
            os.replace(tmp, out)  # atomic: another process may be building the same file
            _built_in = time.perf_counter() - start
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"compiler {' '.join(cxx)!r} failed on the kernels: {e}") \
                from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    lib.MistralJaxCpuIsa.restype = ctypes.c_int64
    lib.MistralJaxCpuIsa.argtypes = [ctypes.c_int64]
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.MistralJaxMatmul),
                                platform="cpu")
    jax.ffi.register_ffi_target(_ROWS, jax.ffi.pycapsule(lib.MistralJaxRows), platform="cpu")
    jax.ffi.register_ffi_target(_ATTENTION, jax.ffi.pycapsule(lib.MistralJaxAttention),
                                platform="cpu")
    return lib


def _library() -> ctypes.CDLL | None:
    """The built and registered library, or None (warned once) where it cannot be built."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except Exception as e:  # noqa: BLE001 - any failure means: use the reference
                warnings.warn(f"mistral_jax.kernels: CPU matmul kernel unavailable, using "
                              f"the jnp reference: {e}", RuntimeWarning, stacklevel=3)
        return _lib


def available() -> bool:
    """True where `matmul` runs the kernel: a CPU backend, the library built and registered,
    and MISTRAL_JAX_CPU_KERNEL not off."""
    if _mode() == "off" or jax.default_backend() != "cpu":
        return False
    return _library() is not None


def isa() -> str:
    """The path `matmul` takes: "avx512", "avx2", "scalar"; "off" (MISTRAL_JAX_CPU_KERNEL)
    or "unavailable" (not CPU, or no library) when it is `reference`."""
    mode = _mode()
    if mode == "off":
        return "off"
    if not available():
        return "unavailable"
    return _ISA_NAMES[_library().MistralJaxCpuIsa(_ISA_CODES[mode])]


def _check(x, w, scale, index, layout):
    if layout not in ("kn", "nk"):
        raise ValueError(f"layout must be 'kn' or 'nk', not {layout!r}")
    stacked = index is not None
    if x.ndim != 2 or w.ndim != 2 + stacked:
        raise ValueError(f"x must be [M, K] and w {'[L, K, N]' if stacked else '[K, N]'} "
                         f"(index {'given' if stacked else 'None'}); got {x.shape}, {w.shape}")
    K, N = w.shape[-2:] if layout == "kn" else w.shape[:-3:-1]
    if x.shape[1] != K:
        raise ValueError(f"x {x.shape} and w {w.shape} (layout {layout}) disagree on K")
    if stacked and not isinstance(index, jax.core.Tracer) and not 0 <= int(index) < w.shape[0]:
        raise ValueError(f"layer index {int(index)} is outside w's {w.shape[0]} layers")
    if w.dtype == jnp.int8:
        if scale is None or scale.ndim != w.ndim or scale.shape[:-2] != w.shape[:-2]:
            raise ValueError(f"int8 w {w.shape} needs a scale of the same rank, got "
                             f"{None if scale is None else scale.shape}")
        G, n = scale.shape[-2:] if layout == "kn" else scale.shape[:-3:-1]
        if n != N or G < 1 or K % G:
            raise ValueError(f"scale {scale.shape}: expected [G, N] (kn) or [N, G] (nk) "
                             f"with G dividing K={K}, N={N}")
    elif w.dtype in (jnp.bfloat16, jnp.float32):
        if scale is not None:
            raise ValueError(f"{w.dtype} w takes no scale")
    else:
        raise ValueError(f"w must be bfloat16, int8 or float32, not {w.dtype}")
    return N


def _multi_device(*arrays) -> bool:
    """Whether the call is laid out over several devices (then XLA partitions the reference)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return True
    for a in arrays:
        sharding = getattr(a, "sharding", None)
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and sharding \
                is not None and len(sharding.device_set) > 1:
            return True
    return False


def reference(x, w, scale=None, *, index=None, layout="kn"):
    """`matmul` in plain jnp: a dot against w converted to x's dtype, per group, then the
    scale (so XLA on GPU fuses the convert into the dot; no float copy of w * scale)."""
    _check(x, w, scale, index, layout)
    x = x.astype(jnp.float32)
    if index is not None:
        w = w[index]
        scale = None if scale is None else scale[index]
    wf = w.astype(x.dtype)
    if scale is None:
        return x @ wf if layout == "kn" else x @ wf.T
    M, K = x.shape
    if layout == "kn":
        G = scale.shape[0]
        if G == 1:
            return (x @ wf) * scale[0]
        part = jnp.einsum("mgk,gkn->mgn", x.reshape(M, G, K // G), wf.reshape(G, K // G, -1))
        return jnp.einsum("mgn,gn->mn", part, scale)
    G = scale.shape[1]
    if G == 1:
        return (x @ wf.T) * scale[:, 0]
    part = jnp.einsum("mgk,ngk->mgn", x.reshape(M, G, K // G), wf.reshape(-1, G, K // G))
    return jnp.einsum("mgn,ng->mn", part, scale)


def matmul(x, w, scale=None, *, index=None, layout="kn"):
    """x @ w (layout "kn", w [K, N]) or x @ w.T ("nk", w [N, K]) for bfloat16 or int8 (with
    `scale`) weights, float32 [M, N]; with `index`, w (and scale) are stacked and layer
    `index` is used. The CPU kernel where `available()`, else `reference`."""
    N = _check(x, w, scale, index, layout)
    if not available() or _multi_device(x, w, scale):
        return reference(x, w, scale, index=index, layout=layout)
    x = x.astype(jnp.float32)
    if scale is None:
        scale = jnp.zeros((0,), jnp.float32)
    idx = jnp.asarray(0 if index is None else index, jnp.int32).reshape(())
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x.shape[0], N), jnp.float32))
    return call(x, w, scale.astype(jnp.float32), idx, nk=np.int64(layout == "nk"),
                isa=np.int64(_ISA_CODES[_mode()]))


def rows(table, ids, scale=None):
    """Rows `ids` (int, any shape) of an embedding table [V, D] (float32, bfloat16, or int8
    with `scale` [V, G]), as float32 [*ids.shape, D], read in place where `available()`.
    (XLA:CPU gathers a bfloat16 table by converting the whole table to float32 first, and
    hoists that out of a decode loop: a call of the loop then paid for the whole table.)"""
    shape = (*jnp.shape(ids), table.shape[1])
    if not available() or _multi_device(table, ids):
        got = jnp.take(table, ids, axis=0).astype(jnp.float32)
        if scale is None:
            return got
        s = jnp.take(scale, ids, axis=0)  # [*ids, G]
        got = got.reshape(*got.shape[:-1], s.shape[-1], -1) * s[..., None]
        return got.reshape(shape)
    call = jax.ffi.ffi_call(_ROWS, jax.ShapeDtypeStruct((math.prod(shape[:-1]), shape[-1]),
                                                        jnp.float32))
    scale = jnp.zeros((0, 0), jnp.float32) if scale is None else scale.astype(jnp.float32)
    return call(table, scale, jnp.asarray(ids, jnp.int32).reshape(-1)).reshape(shape)


def attention(q, k, v, k_scale, v_scale, index, layer, first, k_new, v_new, new_index,
              query_index, *, kv_type: str, window: int | None):
    """A chunk's attention over layer `layer` of a KV cache and its own keys, read in place
    (attention.cc): q [b, c, n, h]; the cache's k [L, B, kv, h, S] and v [L, B, kv, S, h]
    (16-bit floats as their bits; int8 with float32 scales [L, B, kv, S]), its index [B, S];
    the chunk's rows are the cache's rows first .. first + b - 1. k_new / v_new [b, c, kv, h],
    new_index [b, c] (-1: padding), query_index [b, c]. Float32 [b, c, n, h]; a query that
    sees no key gets zeros. Only where `available()` (see `cache.attend_cached`)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    empty = jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call(_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(f32(q), k, v, empty if k_scale is None else f32(k_scale),
                empty if v_scale is None else f32(v_scale), i32(index), f32(k_new), f32(v_new),
                i32(new_index), i32(jnp.broadcast_to(query_index, new_index.shape)),
                i32(layer).reshape(()), i32(first).reshape(()), window=np.int64(window or 0),
                type=np.int64(KV_TYPES[kv_type]), isa=np.int64(_ISA_CODES[_mode()]))
