"""The decoder skeleton both models share: embed, one scanned layer body over stacked weights,
final norm, LM head. `Mistral` and `GPT2` fill in the embedding, the block and the final norm.

The layers' weights carry a leading `layers` axis and run under `jax.lax.scan`, so compile time
does not grow with depth (as MaxText and jax-llm-examples do).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax import kernels
from mistral_jax.arch import weights
from mistral_jax.model import cache as kv
from mistral_jax.model.options import REMAT_POLICIES, Options
from mistral_jax.nn import adapters
from mistral_jax.nn import attention as A
from mistral_jax.nn import layers as L
from mistral_jax.nn.masking import Masking
from mistral_jax.parallel.sharding import ShardingRules, constrain
from mistral_jax.quant import int8 as quant

# The loss runs over chunks of this many tokens beyond it (see Decoder.summed_loss): at 8192
# tokens and a vocabulary of 8000, the float32 logits alone are 262 MB a copy.
LOSS_CHUNK = 2048

# Logical axes of activations: between blocks, and inside the tensor-parallel regions.
ACT = ("batch", "sequence", "embed")
GATHERED = ("batch", None, "embed")  # entering a tensor-parallel region: the whole sequence
HEADS = ("batch", None, "heads", "head_dim")
MLP = ("batch", None, "mlp")


class Output(NamedTuple):
    """What a decoder returns when per-layer outputs are asked for (transformers' names)."""

    logits: jax.Array  # [b, t, vocab] float32
    hidden_states: tuple[jax.Array, ...] | None  # L + 1 of [b, t, d]: embeddings ... final norm
    attentions: tuple[jax.Array, ...] | None  # L of [b, n, t, s] float32


class StackedLayers(nnx.Module):
    """The weights of every layer, stacked on a leading `layers` axis (the rows of the weights
    table named "layers.*"); under a scan, one layer's slice of them."""

    def matmul(self, name: str):
        """Weight `name` as a matmul takes it: the array, or an int8 `quant.QWeight`; with its
        LoRA adapter beside it (`nn.adapters`) when the model carries one for `name`."""
        w = getattr(self, name)
        w = w.weight() if isinstance(w, quant.Int8) else w[...]
        return adapters.adapt(getattr(self, adapters.ATTRIBUTE, None), name, w)


class Indexed:
    """Layer `index` of stacked layer weights, unsliced: its matmul weights go to the CPU
    kernel whole with the index (no per-layer copy), its small weights are sliced."""

    def __init__(self, layers: StackedLayers, index: jax.Array):
        self._layers, self._index = layers, index

    def matmul(self, name: str):
        w = quant.Stacked(*quant.arrays(getattr(self._layers, name)), self._index)
        return adapters.adapt(getattr(self._layers, adapters.ATTRIBUTE, None), name, w,
                              self._index)

    def __getattr__(self, name):
        return _Row(getattr(self._layers, name), self._index)


class _Row:
    def __init__(self, param, index):
        self._param, self._index = param, index

    def __getitem__(self, item):
        return self._param[...][self._index][item]


class Decoder(nnx.Module):
    """Base class: a subclass provides the embedding, the block and the final norm; the weights
    are the rows of its table in `arch/weights.py`, made here.

    `vocab_padded` (>= config.vocab_size) is the row count of the embedding and LM head: padded
    so that the model axis divides it; padded logits are masked and never leave the model.
    `options` (`model.options.Options`) says how it runs: attention, remat, KV cache dtype.
    """

    def __init__(self, config, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
                 tokenizer=None, vocab_padded: int | None = None, options: Options | None = None):
        self.config, self.tokenizer, self.options = config, tokenizer, options or Options()
        make = L.ParamMaker(rngs or nnx.Rngs(0), dtype, config.initializer_range)
        self.layers = StackedLayers()
        table = weights.table(config)
        for w in table:
            shape = weights.shape(w, config, vocab_padded)
            setattr(self.layers if w.stacked else self, w.short,
                    make(shape, w.logical_axes, w.init))
        if "lm_head" not in {w.name for w in table}:
            self.lm_head = None  # tied: the embedding table is the output projection

    @property
    def vocab_padded(self) -> int:
        embed = self.embed.values if isinstance(self.embed, quant.Int8) else self.embed
        return embed.get_value().shape[0]

    # The options, read-only: a model with other options is `options.with_options(model, ...)`
    rules: ShardingRules = property(lambda self: self.options.rules)
    remat = property(lambda self: self.options.remat)
    unroll = property(lambda self: self.options.unroll)
    attention = property(lambda self: self.options.attention)
    attention_blocks = property(lambda self: self.options.attention_blocks)
    kv_cache_dtype = property(lambda self: self.options.kv_cache_dtype)
    compute_dtype = property(lambda self: self.options.compute_dtype)

    def constrain(self, x, axes):
        return constrain(x, axes, self.rules)

    # -- what a subclass provides --
    def embed_inputs(self, input_ids, inputs_embeds, positions, kernel=False):  # -> [b, t, d]
        raise NotImplementedError

    def block(self, layer, x, positions, attend):  # -> (x, what attend returned beside its output)
        """One layer; `attend(q, k, v) -> (out, aux)` is the attention (plain or over a cache)."""
        raise NotImplementedError

    def final_norm(self, x):
        raise NotImplementedError

    # -- shared --
    @property
    def dtype(self):
        """Compute dtype: the weights' dtype, float32 for int8 weights (softmax, norms and the
        loss run in float32 whatever it is)."""
        if self.compute_dtype is not None:
            return jnp.dtype(self.compute_dtype)
        return jnp.float32 if isinstance(self.embed, quant.Int8) else self.embed[...].dtype

    def embedding(self, input_ids, kernel: bool = False):
        """Rows of the embedding table, [*input_ids.shape, d] in the compute dtype; `kernel`:
        read by the CPU kernel (the decode step: see `kernels.rows`)."""
        return self.lookup("embed", input_ids, kernel)

    def lookup(self, name: str, ids, kernel: bool = False):
        """Rows `ids` of table `name` (int8 with its scales, or float) in the compute dtype."""
        table, scale = quant.arrays(getattr(self, name))
        # FSDP: the table gathered from its fsdp shards where it is read, as the layers' weights
        # are (left to XLA, a 2x2x2 mesh's lookup replicated the rows it looked up instead)
        table = self.constrain(table, ("vocab" if name == "embed" else None, None))
        if kernel:
            return kernels.rows(table, ids, scale).astype(self.dtype)
        if scale is not None:
            return quant.rows(table, scale, ids, self.dtype)
        return jnp.take(table, ids, axis=0)

    def __call__(self, input_ids=None, attention_mask=None, positions=None, *, inputs_embeds=None,
                 output_hidden_states: bool = False, output_attentions: bool = False):
        """Logits [b, t, vocab] float32, or an `Output` when per-layer outputs are asked for.

        `attention_mask` [b, t] is 1 for tokens and 0 for padding (left or right); without
        `positions`, positions count tokens only, so a left-padded row equals its unpadded self.
        """
        logits, hidden, attentions = self.run(input_ids, attention_mask, positions,
                                              inputs_embeds, output_hidden_states,
                                              output_attentions)
        logits = logits[..., : self.config.vocab_size]
        if not (output_hidden_states or output_attentions):
            return logits
        return Output(logits, hidden, attentions)

    def run(self, input_ids, attention_mask, positions, inputs_embeds=None,
            output_hidden_states=False, output_attentions=False, segment_ids=None):
        """(vocab-padded logits, hidden states or None, attentions or None).

        `segment_ids` [b, t] (packed documents): a token attends only within its own segment."""
        x, hidden, attentions = self.features(input_ids, attention_mask, positions,
                                              inputs_embeds, output_hidden_states,
                                              output_attentions, segment_ids)
        return self.lm_logits(x), hidden, attentions

    def features(self, input_ids, attention_mask, positions, inputs_embeds=None,
                 output_hidden_states=False, output_attentions=False, segment_ids=None):
        """`run` before the LM head: (the final norm's output [b, t, d], hidden states or None,
        attentions or None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        b, t = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        may_be_left_padded = None if attention_mask is not None else False  # (for cuDNN)
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = L.default_positions(attention_mask)
        masking = Masking(attention_mask.astype(bool), segment_ids, self.config.sliding_window)
        x = self.constrain(self.embed_inputs(input_ids, inputs_embeds, positions), ACT)
        attend = self.attend_with(masking, weights=output_attentions,
                                  left_padded=may_be_left_padded)

        def body(x, layer):
            y, probs = self.block(layer, x, positions, attend)
            y = self.constrain(y, ACT)
            return y, (y if output_hidden_states else None, probs)

        if self.remat != "none":
            # a scan keeps XLA from merging the recomputation back into the forward pass;
            # unrolled layers do not, so there the barrier stays (or remat saves nothing)
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat],
                                  prevent_cse=self.unroll is True or self.unroll > 1)
        x0 = x
        x, (per_layer, probs) = jax.lax.scan(body, x, self.layers, unroll=self.unroll)
        x = self.final_norm(x)
        hidden = None
        if output_hidden_states:  # transformers' convention: the last entry is after the final norm
            hidden = (x0, *(per_layer[i] for i in range(per_layer.shape[0] - 1)), x)
        attentions = tuple(probs) if output_attentions else None
        return self.constrain(x, GATHERED), hidden, attentions

    def step(self, input_ids, valid, positions, cache, start, fresh: bool = False, first=None):
        """A chunk of tokens against a KV cache -> (the last position's logits [b, vocab_padded],
        the cache with the chunk written). input_ids/valid/positions: [b, c]; start: the sequence
        index of the chunk's first token, a scalar (every row left-aligned at it) or [b] (each
        row at its own index: continuous batching). `fresh`: the cache holds nothing yet (the
        first chunk), so it is not read. The chunk's rows are the cache's batch rows first ..
        first + b - 1 (default: the first b; continuous batching steps the rows in use of a
        larger cache, and prefills one row of it: `first` (traced), with a per-row `start`)."""
        kernel = quant.kernel_ok(self)
        x = self.constrain(self.embed_inputs(input_ids, None, positions, kernel), ACT)
        new_index = kv.chunk_indices(start, valid)
        query_index = kv.sequence_indices(start, input_ids.shape[1])  # [c] or [b, c]
        alone = self.attend_with(Masking(new_index >= 0, None, self.config.sliding_window),
                                 left_padded=True) if fresh else None
        blocks = kv.blocks_in_use(cache, input_ids.shape[0], first)

        def body(x, layer_and_index):
            layer, i = layer_and_index
            if kernel:
                layer = Indexed(self.layers, i)

            def attend(q, k, v):
                if fresh:  # the chunk attends to itself alone: as in training
                    out = alone(q, k, v)[0]
                else:
                    out = kv.attend_cached(q, cache, i, blocks, k, v, new_index, query_index,
                                           self.config.sliding_window, first, kernel)
                return out, (k, v)

            x, (k, v) = self.block(layer, x, positions, attend)
            return self.constrain(x, ACT), (k, v)

        # The cache is read in blocks inside the scan; the chunk's keys come out of it and are
        # written once after, in place, so a step moves only the cache's bytes in use.
        # In the CPU kernel the matmuls read each layer's weights in place (kernel); scanning
        # over the stacked weights would have XLA copy every layer's slice first.
        layers = jnp.arange(self.config.n_layers)
        x, (k, v) = jax.lax.scan(body, x, (None if kernel else self.layers, layers))
        x = self.final_norm(x[:, -1:])
        logits = self.lm_logits(self.constrain(x, GATHERED), kernel=kernel)[:, 0]
        return logits, kv.write(cache, k, v, new_index, start, first)

    def attend_with(self, masking, *, weights: bool = False, left_padded: bool | None = None):
        """This model's `attend(q, k, v)` under `masking` (see `attention.attend_with`)."""
        return A.attend_with(self.attention, masking, weights=weights,
                             blocks=self.attention_blocks, dtype=self.dtype,
                             left_padded=left_padded)

    def lm_logits(self, x, kernel: bool = False):
        """Vocab-parallel logits [b, t, vocab_padded] float32, padded columns at -1e30;
        `kernel`: in the CPU kernel (the decode step)."""
        tied = self.lm_head is None  # tied: the embedding table is the output projection
        name = "embed" if tied else "lm_head"
        w, scale = quant.arrays(getattr(self, name))
        equation = "btd,vd->btv" if tied else "btd,dv->btv"
        if kernel or scale is not None:
            w = w if scale is None else quant.QWeight(w, scale)
            logits = quant.project(equation, x, w, kernel=kernel)
        else:
            logits = L.project(equation, x, w)
        logits = self.constrain(logits.astype(jnp.float32), ("batch", None, "vocab"))
        if self.vocab_padded > self.config.vocab_size:
            real = jnp.arange(self.vocab_padded) < self.config.vocab_size
            logits = jnp.where(real, logits, -1e30)
        return logits

    def loss(self, input_ids, attention_mask=None, labels=None, positions=None):
        """Mean next-token cross-entropy; labels default to the input ids with padding ignored."""
        if labels is None:
            labels = input_ids
            if attention_mask is not None:
                labels = jnp.where(attention_mask.astype(bool), labels, L.IGNORE_INDEX)
        x, _, _ = self.features(input_ids, attention_mask, positions)
        total, count = self.summed_loss(x[:, :-1], labels[:, 1:])
        return total / jnp.maximum(count, 1)

    def loss_terms(self, input_ids, labels, positions=None, segment_ids=None):
        """(summed next-token cross-entropy, counted tokens) of packed rows: labels[:, i + 1] is
        predicted at i, label -100 is not counted. Sums add up across micro-batches and devices."""
        x, _, _ = self.features(input_ids, None, positions, segment_ids=segment_ids)
        # shift the labels, not the features: slicing [b, t, d] costs a copy and, backward, a pad
        last = jnp.full((labels.shape[0], 1), L.IGNORE_INDEX, labels.dtype)
        return self.summed_loss(x, jnp.concatenate([labels[:, 1:], last], axis=1))

    def summed_loss(self, x, labels):
        """(summed cross-entropy of the LM head's logits of x [b, t, d] against labels [b, t],
        counted tokens), on vocab-sharded logits. Past LOSS_CHUNK tokens the sequence goes
        through in chunks whose logits are recomputed for the backward pass, so memory holds
        one chunk's [b, chunk, vocab] logits, not the whole sequence's."""
        t = x.shape[1]
        if t <= LOSS_CHUNK:
            return L.cross_entropy(self.lm_logits(x), labels)
        n = -(-t // LOSS_CHUNK)
        pad = n * LOSS_CHUNK - t
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=L.IGNORE_INDEX)
        chunks = lambda a: jnp.moveaxis(a.reshape(a.shape[0], n, LOSS_CHUNK, *a.shape[2:]), 1, 0)

        @jax.checkpoint
        def chunk(carry, xl):
            total, count = L.cross_entropy(self.lm_logits(self.constrain(xl[0], GATHERED)),
                                           xl[1])
            return (carry[0] + total, carry[1] + count), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        return jax.lax.scan(chunk, init, (chunks(x), chunks(labels)))[0]
