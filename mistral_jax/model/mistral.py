"""The Mistral decoder (Jiang et al. 2023, "Mistral 7B"): RMSNorm, RoPE, grouped-query attention
with an optional sliding window, SwiGLU MLP. With `sliding_window=None` it is a Llama.

Weights mirror transformers' MistralForCausalLM with heads kept as an explicit axis:
q [d, n, h], k/v [d, k, h], o [n, h, d]; MLP gate/up [d, f], down [f, d]; all layers stacked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mistral_jax.model.decoder import GATHERED, HEADS, MLP, Decoder, StackedLayers
from mistral_jax.nn import layers as L
from mistral_jax.parallel.sharding import kv_heads_on, model_axis_size


class Mistral(Decoder):
    """Its weights are `arch/weights.py`'s "mistral" rows."""

    def embed_inputs(self, input_ids, inputs_embeds, positions, kernel=False):
        if inputs_embeds is not None:
            return inputs_embeds.astype(self.dtype)
        return self.embedding(input_ids, kernel)

    def block(self, w: StackedLayers, x, positions, attend):
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
