"""`python bench/collectives.py`: the collectives XLA compiles for one tensor-parallel layer
(forward) and for a whole training step (loss + gradients), per mesh, on 8 fake CPU devices.

XLA's CPU backend writes a reduce-scatter as an all-reduce whose result each device slices, so
with sequence parallelism a layer shows 2 all-reduces + 2 all-gathers here (2 reduce-scatters +
2 all-gathers on GPU/TPU); tests/test_sharding.py checks that the slices are all that reads them.
"""

import math
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mistral_jax  # noqa: E402
from mistral_jax.arch import configs
from mistral_jax.model import registry as models
from mistral_jax.model.decoder import ACT
from mistral_jax.nn.masking import Masking  # noqa: E402
from mistral_jax.parallel import sharding  # noqa: E402

CONFIGS = {
    "mistral (8 heads, 2 kv heads)": configs.MistralConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, sliding_window=64),
    "gpt2 (8 heads)": configs.GPT2Config(vocab_size=1000, n_embd=256, n_layer=2, n_head=8),
}


def main():
    b, t = 8, 64
    ids = np.zeros((b, t), np.int32)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    print(f"{'model':32} {'mesh':5} {'seq-par':7} {'what':12} collectives")
    for name, config in CONFIGS.items():
        model = models.init(config)
        for spec in ["1x2", "1x8", "2x4"]:
            for sp in (False, True):
                size = math.prod(sharding.parse_mesh(spec))
                mesh = mistral_jax.make_mesh(spec, jax.devices()[:size])
                m = mistral_jax.shard(model, mesh, sequence_parallel=sp)
                layer = jax.tree.map(lambda x: x[0], m.layers)
                with jax.set_mesh(m.embed[...].sharding.mesh):
                    attend = m.attend_with(Masking(jnp.ones((b, t), bool), None,
                                                   config.sliding_window))
                    block = jax.jit(lambda w, x, m=m, attend=attend: m.constrain(
                        m.block(w, x, positions, attend)[0], ACT))
                    x = jax.device_put(jnp.ones((b, t, config.hidden_size)), m.rules.spec(ACT))
                    layer_hlo = block.lower(layer, x).compile().as_text()
                    step = jax.jit(jax.value_and_grad(lambda m, i: m.loss(i)))
                    step_hlo = step.lower(m, ids).compile().as_text()
                for what, hlo in (("layer fwd", layer_hlo), ("train step", step_hlo)):
                    counts = {k: v for k, v in sharding.count_collectives(hlo).items() if v}
                    print(f"{name:32} {spec:5} {str(sp):7} {what:12} {counts}")


if __name__ == "__main__":
    main()
