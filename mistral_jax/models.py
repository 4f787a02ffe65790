"""From a config to a model: the class for each config type, random init, abstract shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.configs import Config, GPT2Config, MistralConfig
from mistral_jax.decoder import Decoder
from mistral_jax.gpt2 import GPT2
from mistral_jax.mistral import Mistral


def model_class(config: Config) -> type[Decoder]:
    if isinstance(config, MistralConfig):
        return Mistral
    if isinstance(config, GPT2Config):
        return GPT2
    raise TypeError(f"no model for config type {type(config).__name__}")


def init(config: Config, *, seed: int = 0, dtype=jnp.float32, tokenizer=None,
         vocab_padded: int | None = None, mesh=None) -> Decoder:
    """A randomly initialised model (normal(0, initializer_range) weights, unit norms).

    With `mesh`, each weight is created directly in its shard (no device holds a whole one) and
    the vocab is padded as the mesh needs.
    """
    if mesh is not None:
        from mistral_jax import sharding

        vocab_padded = vocab_padded or sharding.padded_vocab_size(config.vocab_size,
                                                                  mesh.shape[sharding.MODEL])

    def make():
        return model_class(config)(config, rngs=nnx.Rngs(seed), dtype=dtype, tokenizer=tokenizer,
                                   vocab_padded=vocab_padded)

    if mesh is None:
        return make()
    model = nnx.eval_shape(make)
    create = jax.jit(lambda: weights(make()), out_shardings=sharding.weight_shardings(model, mesh))
    return with_weights(model, create())


def abstract(config: Config, *, dtype=jnp.float32, tokenizer=None,
             vocab_padded: int | None = None) -> Decoder:
    """The model with `jax.ShapeDtypeStruct`s in place of weights: no memory, no compute."""
    return nnx.eval_shape(lambda: init(config, dtype=dtype, tokenizer=tokenizer,
                                       vocab_padded=vocab_padded))


def weights(model: Decoder) -> dict:
    """The nested dict of weight arrays ({"embed": ..., "layers": {"q": ...}}), as saved."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_weights(model: Decoder, tree: dict) -> Decoder:
    """A copy of `model` (abstract or not) holding the arrays of the nested dict `tree`."""
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state)


def logical_axes(model: Decoder) -> dict:
    """The nested dict of each weight's logical axes (the `axes` metadata of its Param)."""
    state = nnx.state(model, nnx.Param)
    axes = jax.tree.map(lambda p: p.get_metadata()["axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"layers": {"q": x}} -> {"layers.q": x}: the dotted names used in messages and key maps."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def resize_vocab(tree: dict, axes: dict, size: int) -> dict:
    """Cut or zero-pad every weight's `vocab` axis to `size` rows (Megatron's vocab padding)."""

    def resize(x, names):
        if "vocab" not in names:
            return x
        i = names.index("vocab")
        if x.shape[i] >= size:
            return jax.lax.slice_in_dim(x, 0, size, axis=i)
        pad = [(0, 0)] * x.ndim
        pad[i] = (0, size - x.shape[i])
        return jnp.pad(x, pad)

    return jax.tree.map(resize, tree, axes)
