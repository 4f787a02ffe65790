"""The Mistral decoder (Jiang et al. 2023, "Mistral 7B"): RMSNorm, RoPE, grouped-query attention
with an optional sliding window, SwiGLU MLP. With `sliding_window=None` it is a Llama.

Weights mirror transformers' MistralForCausalLM with heads kept as an explicit axis:
q [d, n, h], k/v [d, k, h], o [n, h, d]; MLP gate/up [d, f], down [f, d]; all layers stacked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.arch.configs import MistralConfig
from mistral_jax.model.decoder import GATHERED, HEADS, MLP, Decoder, StackedLayers
from mistral_jax.nn import layers as L
from mistral_jax.parallel.sharding import kv_heads_on, model_axis_size


class MistralLayers(StackedLayers):
    """The weights of every layer, stacked on a leading `layers` axis."""

    def __init__(self, c: MistralConfig, make: L.ParamMaker):
        d, n, k, h, f = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                         c.intermediate_size)
        self.attn_norm = make((d,), ("embed",), "ones")
        self.q = make((d, n, h), ("embed", "heads", "head_dim"))
        self.k = make((d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v = make((d, k, h), ("embed", "kv_heads", "head_dim"))
        self.o = make((n, h, d), ("heads", "head_dim", "embed"))
        self.mlp_norm = make((d,), ("embed",), "ones")
        self.gate = make((d, f), ("embed", "mlp"))
        self.up = make((d, f), ("embed", "mlp"))
        self.down = make((f, d), ("mlp", "embed"))


class Mistral(Decoder):
    # config field -> (weight, axis) that holds it: how a config is read back off the weights
    SIZES = {"vocab_size": ("embed", 0), "hidden_size": ("embed", 1),
             "num_hidden_layers": ("layers.q", 0), "num_attention_heads": ("layers.q", 2),
             "head_dim": ("layers.q", 3), "num_key_value_heads": ("layers.k", 2),
             "intermediate_size": ("layers.gate", 2)}

    def __init__(self, config: MistralConfig, *, rngs: nnx.Rngs | None = None,
                 dtype=jnp.float32, tokenizer=None, vocab_padded: int | None = None):
        c = self.config = config
        self.tokenizer = tokenizer
        self.vocab_padded = v = vocab_padded or c.vocab_size
        make = L.ParamMaker(rngs or nnx.Rngs(0), dtype, c.initializer_range)
        self.embed = make((v, c.hidden_size), ("vocab", "embed"))
        stacked = L.ParamMaker(make.rngs, dtype, make.std, layers=c.num_hidden_layers)
        self.layers = MistralLayers(c, stacked)
        self.norm = make((c.hidden_size,), ("embed",), "ones")
        self.lm_head = None if c.tie_word_embeddings else make((c.hidden_size, v),
                                                                ("embed", "vocab"))

    def embed_inputs(self, input_ids, inputs_embeds, positions, kernel=False):
        if inputs_embeds is not None:
            return inputs_embeds.astype(self.dtype)
        return self.embedding(input_ids, kernel)

    def block(self, w: MistralLayers, x, positions, attend):
        c = self.config
        with jax.named_scope("attention"):
            y = self.constrain(L.rms_norm(x, w.attn_norm[...], c.rms_norm_eps), GATHERED)
            q = L.rope(L.project("btd,dnh->btnh", y, w.matmul("q")), positions, c.rope_theta)
            k = L.rope(L.project("btd,dkh->btkh", y, w.matmul("k")), positions, c.rope_theta)
            v = L.project("btd,dkh->btkh", y, w.matmul("v"))
            heads = kv_heads_on(k.shape[2], model_axis_size())
            if heads > k.shape[2]:  # each device keeps the kv head its query heads use
                k, v = (jnp.repeat(a, heads // a.shape[2], axis=2) for a in (k, v))
            q, k, v = (self.constrain(a, HEADS) for a in (q, k, v))
            out, aux = attend(q, k, v)
            out = self.constrain(out, HEADS)
            x = x + L.project("btnh,nhd->btd", out, w.matmul("o"))
        with jax.named_scope("mlp"):
            y = self.constrain(L.rms_norm(x, w.mlp_norm[...], c.rms_norm_eps), GATHERED)
            act = L.ACTIVATIONS[c.hidden_act]
            gate, up = (L.project("btd,df->btf", y, w.matmul(n)) for n in ("gate", "up"))
            hidden = self.constrain(act(gate) * up, MLP)
            x = x + L.project("btf,fd->btd", hidden, w.matmul("down"))
        return x, aux

    def final_norm(self, x):
        return L.rms_norm(x, self.norm[...], self.config.rms_norm_eps)
