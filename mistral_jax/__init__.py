"""mistral_jax: Megatron GPT-2 and Mistral decoders in JAX / Flax NNX.

    model = mistral_jax.load("ckpt/")
    logits = mistral_jax.forward(model, input_ids, attention_mask)   # [b, t, vocab] float32
"""

from mistral_jax.arch.configs import ConfigError, GPT2Config, MistralConfig, preset
from mistral_jax.inference.generation import generate, generate_tokens
from mistral_jax.io.checkpoint import CheckpointError, load, save
from mistral_jax.io.lora import LoraError
from mistral_jax.model.apply import forward, loss
from mistral_jax.model.decoder import Decoder, Output
from mistral_jax.model.registry import init, shard
from mistral_jax.parallel.sharding import ShardingError, make_mesh, mesh_of

__all__ = ["CheckpointError", "ConfigError", "Decoder", "GPT2Config", "LoraError",
           "MistralConfig", "Output", "ShardingError", "forward", "generate", "generate_tokens",
           "init", "load", "loss", "make_mesh", "mesh_of", "preset", "save", "shard"]
