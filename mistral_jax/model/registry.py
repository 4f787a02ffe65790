"""From a config to a model: the class for each config type, random init (straight into its
shards on a mesh), abstract shapes; and `shard`, a model moved onto a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.arch.configs import Config, GPT2Config, MistralConfig
from mistral_jax.base import trees
from mistral_jax.model.decoder import Decoder
from mistral_jax.model.gpt2 import GPT2
from mistral_jax.model.mistral import Mistral
from mistral_jax.model.options import Options, with_options
from mistral_jax.parallel.placement import onto, place
from mistral_jax.parallel.sharding import MODEL, padded_vocab_size


def model_class(config: Config) -> type[Decoder]:
    if isinstance(config, MistralConfig):
        return Mistral
    if isinstance(config, GPT2Config):
        return GPT2
    raise TypeError(f"no model for config type {type(config).__name__}")


def init(config: Config, *, seed: int = 0, dtype=jnp.float32, tokenizer=None,
         vocab_padded: int | None = None, mesh=None, options: Options | None = None) -> Decoder:
    """A randomly initialised model (normal(0, initializer_range) weights, unit norms).

    With `mesh`, each weight is created directly in its shard (no device holds a whole one) and
    the vocab is padded as the mesh needs. `options`: how it runs (`model.options.Options`).
    """
    if mesh is not None:
        needed = padded_vocab_size(config.vocab_size, mesh.shape[MODEL])
        if vocab_padded not in (None, needed):
            raise ValueError(f"vocab_padded={vocab_padded}: on this mesh the vocab is padded to "
                             f"{needed}; leave vocab_padded out")
        vocab_padded = needed

    def make():
        return model_class(config)(config, rngs=nnx.Rngs(seed), dtype=dtype, tokenizer=tokenizer,
                                   vocab_padded=vocab_padded, options=options)

    if mesh is None:
        return make()
    model = nnx.eval_shape(make)
    create = jax.jit(lambda: trees.weights(make()), out_shardings=place(model, mesh).shardings)
    return trees.with_weights(model, create())


def abstract(config: Config, *, dtype=jnp.float32, tokenizer=None,
             vocab_padded: int | None = None, options: Options | None = None) -> Decoder:
    """The model with `jax.ShapeDtypeStruct`s in place of weights: no memory, no compute."""
    return nnx.eval_shape(lambda: init(config, dtype=dtype, tokenizer=tokenizer,
                                       vocab_padded=vocab_padded, options=options))


def shard(model: Decoder, mesh, *, sequence_parallel: bool = False, donate: bool = False):
    """`model` on `mesh`: every weight in its rule's sharding, the vocab padded where needed.

    `sequence_parallel` (Korthikanti et al. 2022) also shards the activations between the
    tensor-parallel regions (norms, residuals) on the sequence over `model`, so each all-reduce
    becomes a reduce-scatter + all-gather pair and those activations take 1/T of the memory.
    With `donate`, the input model's arrays are consumed (their memory reused)."""
    sharded = onto(model, place(model, mesh), donate=donate)
    if sharded.options.sequence_parallel == sequence_parallel:
        return sharded
    return with_options(sharded, sequence_parallel=sequence_parallel)
