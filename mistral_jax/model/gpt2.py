"""The GPT-2 decoder (Radford et al. 2019), as trained by OpenAI and by NVIDIA Megatron-LM:
learned positions, pre-LayerNorm, GELU MLP, biases on every projection, tied LM head.

Weights mirror transformers' GPT2LMHeadModel with the fused `c_attn` split into q/k/v and heads
kept as an explicit axis: q/k/v [d, n, h] (+ bias [n, h]), o [n, h, d], fc [d, f], proj [f, d].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.arch.configs import GPT2Config
from mistral_jax.model.decoder import GATHERED, HEADS, MLP, Decoder, StackedLayers
from mistral_jax.nn import layers as L


class GPT2Layers(StackedLayers):
    """The weights of every layer, stacked on a leading `layers` axis."""

    def __init__(self, c: GPT2Config, make: L.ParamMaker):
        d, n, h, f = c.n_embd, c.n_head, c.head_dim, c.n_inner
        self.ln1_scale = make((d,), ("embed",), "ones")
        self.ln1_bias = make((d,), ("embed",), "zeros")
        for name in ("q", "k", "v"):
            setattr(self, name, make((d, n, h), ("embed", "heads", "head_dim")))
            setattr(self, f"{name}_bias", make((n, h), ("heads", "head_dim"), "zeros"))
        self.o = make((n, h, d), ("heads", "head_dim", "embed"))
        self.o_bias = make((d,), ("embed",), "zeros")
        self.ln2_scale = make((d,), ("embed",), "ones")
        self.ln2_bias = make((d,), ("embed",), "zeros")
        self.fc = make((d, f), ("embed", "mlp"))
        self.fc_bias = make((f,), ("mlp",), "zeros")
        self.proj = make((f, d), ("mlp", "embed"))
        self.proj_bias = make((d,), ("embed",), "zeros")


class GPT2(Decoder):
    # config field -> (weight, axis) that holds it: how a config is read back off the weights
    SIZES = {"vocab_size": ("embed", 0), "n_embd": ("embed", 1), "n_positions": ("pos_embed", 0),
             "n_layer": ("layers.q", 0), "n_head": ("layers.q", 2), "n_inner": ("layers.fc", 2)}

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
                 tokenizer=None, vocab_padded: int | None = None):
        c = self.config = config
        self.tokenizer = tokenizer
        self.vocab_padded = v = vocab_padded or c.vocab_size
        make = L.ParamMaker(rngs or nnx.Rngs(0), dtype, c.initializer_range)
        self.embed = make((v, c.n_embd), ("vocab", "embed"))
        self.pos_embed = make((c.n_positions, c.n_embd), (None, "embed"))
        self.layers = GPT2Layers(c, L.ParamMaker(make.rngs, dtype, make.std, layers=c.n_layer))
        self.norm_scale = make((c.n_embd,), ("embed",), "ones")
        self.norm_bias = make((c.n_embd,), ("embed",), "zeros")
        self.lm_head = None if c.tie_word_embeddings else make((c.n_embd, v), ("embed", "vocab"))

    def embed_inputs(self, input_ids, inputs_embeds, positions, kernel=False):
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids, kernel)
        return inputs_embeds.astype(self.dtype) + self.lookup("pos_embed", positions, kernel)

    def block(self, w: GPT2Layers, x, positions, attend):
        c = self.config
        with jax.named_scope("attention"):
            y = L.layer_norm(x, w.ln1_scale[...], w.ln1_bias[...], c.layer_norm_epsilon)
            y = self.constrain(y, GATHERED)
            q = L.project("btd,dnh->btnh", y, w.matmul("q")) + w.q_bias[...]
            k = L.project("btd,dnh->btnh", y, w.matmul("k")) + w.k_bias[...]
            v = L.project("btd,dnh->btnh", y, w.matmul("v")) + w.v_bias[...]
            q, k, v = (self.constrain(a, HEADS) for a in (q, k, v))
            out, aux = attend(q, k, v)
            out = self.constrain(out, HEADS)
            x = x + L.project("btnh,nhd->btd", out, w.matmul("o")) + w.o_bias[...]
        with jax.named_scope("mlp"):
            y = L.layer_norm(x, w.ln2_scale[...], w.ln2_bias[...], c.layer_norm_epsilon)
            y = self.constrain(y, GATHERED)
            hidden = L.ACTIVATIONS[c.activation_function](
                L.project("btd,df->btf", y, w.matmul("fc")) + w.fc_bias[...])
            hidden = self.constrain(hidden, MLP)
            x = x + L.project("btf,fd->btd", hidden, w.matmul("proj")) + w.proj_bias[...]
        return x, aux

    def final_norm(self, x):
        return L.layer_norm(x, self.norm_scale[...], self.norm_bias[...],
                            self.config.layer_norm_epsilon)
