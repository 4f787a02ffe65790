"""mistral_jax.kernels: the CPU matmul kernel (bf16 / int8 weights, small M) against a float64
numpy product of the dequantized weights, on every path this CPU has, and its fallbacks."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax import kernels

ISAS = ("avx512", "avx2", "scalar")
MS = (1, 3, 8, 17)
# (K, N): odd sizes below one vector tile; tiles and ragged edges (N % 4 = 2); several threads
# (1.2 MB of bf16 is over the kernel's one-thread limit), K not a multiple of 16; long kn rows.
SHAPES = ((96, 40), (224, 202), (1000, 600), (64, 4100))
L = 3  # layers in the stacked weights
KINDS = ("bf16", "f32", "int8-g1", "int8-groups")


def _needs_kernel():
    if not kernels.available():
        pytest.skip(f"kernel unavailable here (isa: {kernels.isa()})")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MISTRAL_JAX_CPU_KERNEL", request.param)
    _needs_kernel()
    if kernels.isa() != request.param:
        pytest.skip(f"this CPU lacks {request.param} (would run {kernels.isa()})")
    return request.param


def _weights(rng, kind, layout, K, N, stacked):
    """w (and scale) in the given layout, [L, ...] when stacked, and the float64 dequantized
    [K, N] matrices, one per layer (built in numpy: no XLA compilations)."""
    lead = (L,) if stacked else ()
    shape = lead + ((K, N) if layout == "kn" else (N, K))
    if kind in ("bf16", "f32"):
        w = rng.standard_normal(shape).astype(jnp.bfloat16 if kind == "bf16" else np.float32)
        scale = None
        dense = w.astype(np.float64)
        if layout == "nk":
            dense = np.swapaxes(dense, -1, -2)
    else:
        G = 1 if kind == "int8-g1" else K // 32 if K % 32 == 0 else 25  # 25: groups of 40
        w = rng.integers(-128, 128, shape).astype(np.int8)
        scale = (rng.uniform(0.5, 1.5, lead + ((G, N) if layout == "kn" else (N, G))) / 64
                 ).astype(np.float32)
        wf, sf = w.astype(np.float64), scale.astype(np.float64)
        if layout == "nk":  # to kn: [.., K, N] and [.., G, N]
            wf, sf = np.swapaxes(wf, -1, -2), np.swapaxes(sf, -1, -2)
        dense = (wf.reshape(*lead, G, K // G, N) * sf[..., :, None, :]).reshape(*lead, K, N)
        scale = jnp.asarray(scale)
    return jnp.asarray(w), scale, dense if stacked else dense[None]


def _assert_close(y, x, dense):
    """|y - x @ dense| within 1e-5 of sum |x| |dense| (float32 accumulation over K)."""
    x = np.asarray(x, np.float64)
    err = np.abs(np.asarray(y, np.float64) - x @ dense)
    tol = 1e-5 * (np.abs(x) @ np.abs(dense))
    assert (err <= tol).all(), f"max error / tolerance {np.max(err / tol):.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[0]}N{s[1]}")
@pytest.mark.parametrize("layout", ("kn", "nk"))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64(isa, kind, layout, shape):
    """Each M of MS, plain and with a traced index in a jitted scan over stacked layers."""
    K, N = shape
    rng = np.random.default_rng(K * N)
    xs = [jnp.asarray(rng.standard_normal((m, K)).astype(np.float32)) for m in MS]

    w, scale, dense = _weights(rng, kind, layout, K, N, stacked=False)
    ys = jax.jit(lambda xs, w, s: [kernels.matmul(x, w, s, layout=layout) for x in xs])(
        xs, w, scale)
    for x, y in zip(xs, ys, strict=True):
        assert y.shape == (x.shape[0], N) and y.dtype == jnp.float32
        _assert_close(y, x, dense[0])

    w, scale, dense = _weights(rng, kind, layout, K, N, stacked=True)

    @jax.jit
    def scanned(xs, w, s):
        def step(carry, i):
            return carry, [kernels.matmul(x, w, s, index=i, layout=layout) for x in xs]
        return jax.lax.scan(step, 0, jnp.arange(L, dtype=jnp.int32))[1]

    for x, y in zip(xs, scanned(xs, w, scale), strict=True):
        for layer in range(L):
            _assert_close(y[layer], x, dense[layer])


@pytest.mark.parametrize("layout", ("kn", "nk"))
@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_kernel(kind, layout):
    """The plain-jnp reference: the same float64 check, and close to the kernel."""
    K, N = SHAPES[1]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, K)).astype(np.float32))
    w, scale, dense = _weights(rng, kind, layout, K, N, stacked=True)
    ref = jax.jit(lambda x, w, s: kernels.reference(x, w, s, index=2, layout=layout))(
        x, w, scale)
    _assert_close(ref, x, dense[2])
    _needs_kernel()
    y = jax.jit(lambda x, w, s: kernels.matmul(x, w, s, index=2, layout=layout))(x, w, scale)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_reads_the_layer_in_place():
    """With index, the stacked weights go to the kernel whole: no slice (copy) of a layer."""
    _needs_kernel()
    w = jnp.zeros((L, 64, 128), jnp.bfloat16)
    f = jax.jit(lambda x, w, i: kernels.matmul(x, w, index=i))
    hlo = f.lower(jnp.zeros((1, 64)), w, jnp.int32(1)).as_text()
    assert "mistral_jax_matmul" in hlo and "dynamic_slice" not in hlo


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_the_same_inputs_give_the_same_bits(kind):
    """A weight large enough to be split over threads (the kn path splits K): each part sums
    into its own buffer, added in a fixed order, whichever thread took it (a decode that gave
    other logits on a second run was the symptom)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 1536)), jnp.float32)
    w = rng.normal(size=(1536, 640))
    if kind == "bf16":
        w, scale = jnp.asarray(w, jnp.bfloat16), None
    else:
        w, scale = jnp.asarray(np.clip(np.round(w * 40), -127, 127), jnp.int8), \
            jnp.asarray(rng.uniform(0.01, 0.02, size=(1, 640)), jnp.float32)
    f = jax.jit(lambda x, w, s: kernels.matmul(x, w, s))
    first = np.asarray(f(x, w, scale))
    for _ in range(30):
        np.testing.assert_array_equal(np.asarray(f(x, w, scale)), first)


@pytest.mark.parametrize("layout", ("kn", "nk"))
@pytest.mark.parametrize("kind", KINDS)
def test_a_row_gets_the_same_bits_in_any_batch(isa, kind, layout):
    """Each row of x computes its outputs in the same order whatever M is (tiles, accumulators
    and the thread split depend on the weight, not on M): a batched decode step gives each
    request what it gets alone, bit for bit. The LM head's shape (nk, long N) included."""
    rng = np.random.default_rng(7)
    for K, N in (SHAPES[2], (576, 4096)):
        w, scale, _ = _weights(rng, kind, layout, K, N, stacked=False)
        x = jnp.asarray(rng.standard_normal((32, K)).astype(np.float32))
        f = jax.jit(lambda x, w, s: kernels.matmul(x, w, s, layout=layout))
        alone = np.concatenate([np.asarray(f(x[i:i + 1], w, scale)) for i in range(4)])
        for m in (2, 4, 8, 32):
            np.testing.assert_array_equal(np.asarray(f(x[:m], w, scale))[:4], alone[:m][:4])


@pytest.mark.parametrize("kind", ("bf16", "f32", "int8"))
def test_rows_are_the_tables_rows(kind):
    """kernels.rows: an embedding lookup read in place, float32, int8 times its row's scales
    (groups of D/G); the reference where the kernel is off."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((50, 64))
    scale = None
    if kind == "int8":
        table = np.clip(np.round(table * 40), -127, 127).astype(np.int8)
        scale = rng.uniform(0.01, 0.02, (50, 2)).astype(np.float32)
        want = (table.astype(np.float64).reshape(50, 2, 32) * scale[:, :, None]).reshape(50, 64)
    else:
        table = table.astype(jnp.bfloat16 if kind == "bf16" else np.float32)
        want = table.astype(np.float64)
    ids = np.array([[3, 49, 0], [3, 7, 7]], np.int32)
    for rows in (jax.jit(kernels.rows), kernels.rows):
        got = rows(jnp.asarray(table), ids, None if scale is None else jnp.asarray(scale))
        assert got.shape == (2, 3, 64) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got, np.float64), want[ids], rtol=1e-6)


def test_bfloat16_x_and_reference_agree():
    _needs_kernel()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.integers(-128, 128, (128, 96)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, (4, 96)).astype(np.float32))
    y = kernels.matmul(x, w, scale)
    np.testing.assert_allclose(y, kernels.reference(x, w, scale), rtol=1e-5, atol=1e-3)


def test_rejects_bad_arguments():
    x = jnp.zeros((1, 64))
    w8 = jnp.zeros((64, 32), jnp.int8)
    with pytest.raises(ValueError, match="scale"):
        kernels.matmul(x, w8)
    with pytest.raises(ValueError, match="G dividing"):
        kernels.matmul(x, w8, jnp.ones((3, 32)))
    with pytest.raises(ValueError, match="no scale"):
        kernels.matmul(x, w8.astype(jnp.bfloat16), jnp.ones((1, 32)))
    with pytest.raises(ValueError, match="disagree on K"):
        kernels.matmul(x, jnp.zeros((64, 32), jnp.bfloat16), layout="nk")
    with pytest.raises(ValueError, match="index"):
        kernels.matmul(x, jnp.zeros((2, 64, 32), jnp.bfloat16))


@pytest.mark.parametrize("index", [-1, 3, 7])
def test_a_layer_index_outside_the_stack_is_refused(index):
    """A number at once, in either path; a traced one by the kernel when it runs (it used to
    clamp it silently to the first or last layer)."""
    x, w = jnp.ones((1, 64)), jnp.ones((3, 64, 32), jnp.bfloat16)
    for fn in (kernels.matmul, kernels.reference):
        with pytest.raises(ValueError, match=f"layer index {index} is outside w's 3 layers"):
            fn(x, w, index=index)
    _needs_kernel()
    traced = jax.jit(lambda i: kernels.matmul(x, w, index=i))
    assert np.array_equal(traced(2), kernels.reference(x, w, index=2))
    with pytest.raises(ValueError, match=f"INVALID_ARGUMENT: matmul: layer index {index} is "
                       "outside w's 3 layers"):  # how jax raises an FFI InvalidArgument
        traced(index).block_until_ready()


_CHILD = """
import json, warnings
import jax.numpy as jnp, numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from mistral_jax import kernels
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    w = jnp.asarray(rng.integers(-128, 128, (2, 64, 48)), jnp.int8)
    s = jnp.asarray(rng.uniform(0.5, 1.5, (2, 2, 48)).astype(np.float32))
    y = kernels.matmul(x, w, s, index=1)
    ref = kernels.reference(x, w, s, index=1)
    avail, isa = kernels.available(), kernels.isa()
print(json.dumps({"available": avail, "isa": isa, "equal": bool(np.array_equal(y, ref)),
                  "warnings": [str(w.message) for w in caught]}))
"""


def _child(tmp_path, **env):
    env = {**os.environ, "MISTRAL_JAX_CACHE": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_off_is_the_reference(tmp_path):
    got = _child(tmp_path, MISTRAL_JAX_CPU_KERNEL="off")
    assert got == {"available": False, "isa": "off", "equal": True, "warnings": []}
    assert not (tmp_path / "kernels").exists()  # nothing built


def test_broken_compiler_warns_and_falls_back(tmp_path):
    got = _child(tmp_path, CXX="/bin/false", MISTRAL_JAX_CPU_KERNEL="auto")
    assert not got["available"] and got["isa"] == "unavailable" and got["equal"]
    assert len(got["warnings"]) == 1 and "/bin/false" in got["warnings"][0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("window,c", [(None, 1), (None, 3), (5, 1), (5, 4)])
def test_attention_reads_the_cache_as_xla_does(dtype, window, c):
    """kernels.attention (the decode step's, reading the cache in place) against the XLA path
    of cache.attend_cached: rows 1..2 of a 4-row cache, slots in use, an empty slot, a padded
    key of the chunk, a window, grouped queries, chunks of 1 to 4 queries."""
    from mistral_jax.arch import configs
    from mistral_jax.model import cache as kv

    _needs_kernel()
    config = configs.MistralConfig(vocab_size=16, hidden_size=32, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=8, sliding_window=None,
                                   max_position_embeddings=512)
    rng = np.random.default_rng(11)
    cache = kv.KVCache.create(config, 4, 300, dtype)
    b, n, k, h = 2, 6, 2, 8
    index = np.full((4, cache.slots), -1, np.int32)
    index[:, :40] = np.arange(40)
    index[:, 7] = -1  # an empty slot among them
    new_k = jnp.asarray(rng.normal(size=(2, 4, 40, k, h)), jnp.float32)  # [L, rows, c, kv, h]
    cache = kv.write(cache, jnp.concatenate([new_k, new_k], 1), jnp.concatenate(
        [new_k, new_k], 1) * 0.5, jnp.asarray(index[:, :40]), jnp.zeros(4, jnp.int32))
    cache = kv.KVCache(cache.k, cache.v, jnp.asarray(index), cache.k_scale, cache.v_scale,
                       cache.bits_of)
    q = jnp.asarray(rng.normal(size=(b, c, n, h)), jnp.float32)
    k_new = jnp.asarray(rng.normal(size=(b, c, k, h)), jnp.float32)
    new_index = np.tile(np.arange(40, 40 + c, dtype=np.int32), (b, 1))
    new_index[1, 0] = -1  # padding
    query_index = jnp.asarray(np.tile(np.arange(40, 40 + c, dtype=np.int32), (b, 1)))
    blocks = kv.blocks_in_use(cache, b, 1)
    got, want = (jax.jit(lambda q, layer, kernel=kernel: kv.attend_cached(
        q, cache, layer, blocks, k_new, k_new * 2, jnp.asarray(new_index), query_index, window,
        first=1, kernel=kernel))(q, 1) for kernel in (True, False))
    # (XLA's path weighs 16-bit values with 16-bit probabilities; the kernel in float32)
    tol = 2e-5 if dtype in ("float32", "int8") else 3e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
    assert np.abs(np.asarray(got)).max() > 0.1
