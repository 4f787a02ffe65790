"""The programs a plan compiles, with shapes in place of arrays: the fine-tuning run's own train
step (train.run.loop's `Step`, the objective's batch sharding, train.compute.step's state), and
for `--serve` one decode step of the KV cache. Nothing here allocates a weight: the model is
`model.registry.abstract` placed as `parallel.placement.place` says, the state is
`jax.eval_shape` of the run's own `init_state`."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.base import trees
from mistral_jax.inference.kv_cache import new_cache
from mistral_jax.model import registry as models
from mistral_jax.model.options import Options
from mistral_jax.parallel.placement import place
from train.compute import flops
from train.compute import step as S
from train.run.loop import CausalLM, Step

BATCH_FIELDS = ("ids", "labels", "positions", "segments")  # train.input.data.place's, int32


@dataclass
class Compiled:
    """A compiled program and what it was compiled on."""

    compiled: object  # jax.stages.Compiled; None when the compiler refused it for memory
    arguments: dict  # name -> abstract tree of the program's inputs (bytes per device)
    model_flops: float | None  # the step's model FLOPs (train.compute.flops), all devices
    refused: str | None = None  # the TPU compiler's out-of-memory message


def compile_or_refusal(lowered) -> tuple[object, str | None]:
    """(the compiled program, None), or (None, why) when the TPU compiler refuses a program
    that does not fit the chip's HBM (it does: RESOURCE_EXHAUSTED, with the bytes)."""
    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).strip().splitlines()[0]


def with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def abstract_model(config, mesh, options: Options, dtype=jnp.float32):
    """The model on `mesh` as shapes: vocab padded and each weight sharded as a run loads it."""
    placement = place(models.abstract(config, dtype=dtype, options=options), mesh)
    model = models.abstract(config, dtype=dtype, vocab_padded=placement.vocab_padded,
                            options=options)
    return trees.with_weights(model, with_shardings(trees.weights(model), placement.shardings))


def train_step(args, config, mesh) -> Compiled:
    """The run's train step for flags `args`, compiled for `mesh`'s devices."""
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    objective = CausalLM()
    step = Step(args, mesh, dtype, objective)
    # outside the mesh: optax's `tree_map_params` runs the optimizer's init eagerly (a step
    # count), on the default device, which a TPU topology's devices cannot be
    params = step.wire(abstract_model(config, mesh, step.options))
    with jax.set_mesh(mesh):
        state = with_shardings(
            jax.eval_shape(lambda p: S.init_state(p, step.tx, args.seed, step.shardings), params),
            step.shardings)
        # the run's own Batches with no rows: its checks (the batch splits over the mesh) and
        # its sharding, nothing read
        sharding = objective.batches(None, args, mesh).sharding
        shape = (args.grad_accum, args.batch_size // args.grad_accum, args.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
                 for k in BATCH_FIELDS}
        compiled, refused = compile_or_refusal(step.train_step.lower(state, step.frozen, batch))
    work = flops.training_flops(config, lora_targets=args.lora_targets,
                                lora_rank=args.lora_rank or 0)
    segments = np.zeros((args.batch_size, args.seq_len), np.int32)  # one document a row
    pairs = flops.attention_pairs(segments, config.sliding_window, args.isolate_documents)
    return Compiled(compiled, {"state": state, "frozen": step.frozen, "batch": batch},
                    work.of(args.batch_size * args.seq_len, pairs), refused)


def decode_step(args, config, mesh) -> Compiled:
    """One decode step (a token for each of `batch_size` rows over a cache of `seq_len`
    entries), the weights in `--dtype`, compiled for `mesh`'s devices."""
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = abstract_model(config, mesh, Options(attention=args.attention), dtype)
    b = args.batch_size
    with jax.set_mesh(mesh):
        cache = jax.eval_shape(lambda: new_cache(model, b, args.seq_len, mesh))
        cache = with_shardings(cache, jax.tree.map(lambda x: x.sharding, cache))
        replicated = NamedSharding(mesh, P())
        token = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=replicated)
        index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)

        def decode(model, cache, token, index):
            return model.step(token, jnp.ones_like(token), index + jnp.zeros_like(token),
                              cache, index)

        compiled, refused = compile_or_refusal(
            jax.jit(decode, donate_argnums=1).lower(model, cache, token, index))
    return Compiled(compiled, {"weights": trees.weights(model), "cache": cache,
                               "token": (token, index)}, None, refused)


def shard_bytes(tree) -> int:
    """The bytes one device holds of `tree`'s abstract arrays: each leaf's shard on the first
    device (a mesh splits evenly, so every device holds as much)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total
