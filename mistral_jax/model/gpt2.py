"""The GPT-2 decoder (Radford et al. 2019), as trained by OpenAI and by NVIDIA Megatron-LM:
learned positions, pre-LayerNorm, GELU MLP, biases on every projection, tied LM head.

Weights mirror transformers' GPT2LMHeadModel with the fused `c_attn` split into q/k/v and heads
kept as an explicit axis: q/k/v [d, n, h] (+ bias [n, h]), o [n, h, d], fc [d, f], proj [f, d].
"""

from __future__ import annotations

import jax

from mistral_jax.model.decoder import GATHERED, HEADS, MLP, Decoder, StackedLayers
from mistral_jax.nn import layers as L


class GPT2(Decoder):
    """Its weights are `arch/weights.py`'s "gpt2" rows."""

    def embed_inputs(self, input_ids, inputs_embeds, positions, kernel=False):
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids, kernel)
        return inputs_embeds.astype(self.dtype) + self.lookup("pos_embed", positions, kernel)

    def block(self, w: StackedLayers, x, positions, attend):
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
