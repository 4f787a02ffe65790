"""A new KV cache for a batch of sequences, laid out where the model's weights are, and host
values placed beside it: shared by `generation` and the serving engine, whose jitted steps
then find their inputs where their outputs land (and compile once, not twice)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.model.cache import KVCache
from mistral_jax.parallel import sharding
from mistral_jax.quant import int8 as quant


def new_cache(model, batch: int, length: int, mesh) -> KVCache:
    """A cache of `batch` sequences of `length` entries (a sliding window's rolling buffer
    holds fewer), committed to the weights' device, or on `mesh` (the weights' mesh, read
    once by the caller) with the batch over the data axis and the kv heads over the model
    axis, as the model computes them."""
    config = model.config
    tp = sharding.model_axis_size(mesh) if mesh is not None else 1
    kv_heads = sharding.kv_heads_on(config.num_key_value_heads, tp)  # as the model computes
    cache = KVCache.create(config, batch, length, model.kv_cache_dtype or model.dtype, kv_heads)
    if mesh is None:  # committed, where the weights are (see `beside`)
        weight = quant.arrays(model.embed)[0]
        return jax.device_put(cache, weight.sharding if isinstance(weight, jax.Array)
                              else jax.devices()[0])
    data = sharding.batch_axes(mesh, batch)
    model = sharding.MODEL if kv_heads % tp == 0 else None
    # [layers, batch, kv heads, ...]: batch over data, kv heads over model; index [batch, slots]
    spec = lambda x: P(data, None) if x.ndim == 2 else P(None, data, model)  # noqa: E731
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), cache)


def beside(tree, cache: KVCache):
    """`tree`'s arrays committed to the cache's device, or replicated over its mesh: where a
    jitted step's outputs land. (A step called first with uncommitted inputs, then with its
    own outputs, compiles twice.)"""
    sharding = cache.k.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, P())
    return jax.device_put(tree, sharding)
