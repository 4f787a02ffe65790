"""How a built model runs, apart from its weights: one frozen object given at construction or
load, and carried by every transform that makes a new model from an old one (`quant.quantized`
and `dequantized`, `lora.apply`, `registry.shard`). Nothing here is set on a built model:
`with_options(model, attention="xla")` returns a new model that shares the old one's arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.model import cache as kv
from mistral_jax.nn import attention as A
from mistral_jax.parallel.sharding import ShardingRules, rules_for

# Rematerialisation policies for the scanned layer body (what the backward pass keeps from the
# forward): "none" keeps everything, "full" keeps only each layer's input and recomputes the rest,
# "dots" keeps the matmul outputs, "dots_no_batch" keeps only the weight matmuls' outputs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Options:
    attention: str = "auto"  # an attention.IMPLEMENTATIONS name
    attention_blocks: tuple[int, int] | None = None  # (queries, keys); None: the backend's
    kv_cache_dtype: str | None = None  # generation's KV cache: None (the compute dtype), "int8"..
    compute_dtype: str | None = None  # activations: None is the weights' dtype (int8: float32)
    remat: str = "none"  # a REMAT_POLICIES name: what the layer body keeps for the backward pass
    unroll: int | bool = 1  # layers per iteration of the forward scan (True: no loop at all)
    sequence_parallel: bool = False  # activations between blocks sharded on the sequence

    def __post_init__(self):
        A.check(self.attention)
        kv.check_dtype(self.kv_cache_dtype)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        if self.compute_dtype is not None:
            jnp.dtype(self.compute_dtype)  # raises TypeError for a name that is not a dtype
        if self.attention_blocks is not None:
            object.__setattr__(self, "attention_blocks", tuple(self.attention_blocks))

    @property
    def rules(self) -> ShardingRules:
        """How activations are laid out on a mesh (see `registry.shard`)."""
        return rules_for(self.sequence_parallel)


def with_options(model: nnx.Module, **changes) -> nnx.Module:
    """A new model with `changes` to `model`'s options, holding the same arrays (no copy)."""
    options = dataclasses.replace(model.options, **changes)
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)
    new.options = options  # a fresh object nobody else holds yet
    return new
