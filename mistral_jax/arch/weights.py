"""Every weight of each model, described once: its shape in config terms, its logical axes, how
it is initialised, whether it is a matmul (and its layout), and whether LoRA may target it.

Initialisation (`model/`), sharding (`parallel/placement`), int8 quantization (`quant/`), LoRA
(`io/lora`), the config-versus-weights check (`io/checkpoint`) and the converters' key maps all
read these rows, as jax-llm-examples derives init, shardings and restore targets from one
abstract description of each weight. Adding a weight is one row here and one key-map entry.

A row's `dims` name its axes by what they are; `size` turns a name into a number for a config
(the vocab may be padded for tensor parallelism). Stacked weights ("layers.q") lead with the
`layers` axis and run under the decoder's scan. A matmul weight is "kn" when the input axes come
first (used as `x @ w`: [*in, *out]) and "nk" when they come last (the embedding table, whose
rows are the tied LM head's output channels); `inputs` counts its input axes (o: heads and
head_dim). Every matmul weight is quantized by `quant/int8` and may be a LoRA target if stacked.
"""

from __future__ import annotations

import dataclasses
import functools

from mistral_jax.arch.configs import Config, model_type


@dataclasses.dataclass(frozen=True)
class Weight:
    name: str  # dotted: "embed", "layers.q"
    dims: tuple[str, ...]  # each axis by name, a key of SIZES[kind]
    init: str = "normal"  # "normal" (std initializer_range), "ones" or "zeros"
    layout: str | None = None  # a matmul's: "kn" or "nk"; None for norms, biases, positions
    inputs: int = 1  # a matmul's input axes
    axes: tuple[str | None, ...] | None = None  # logical axes, when they are not `dims`
    unless: str | None = None  # a config flag that removes the weight (tie_word_embeddings)

    @property
    def logical_axes(self) -> tuple[str | None, ...]:
        return self.dims if self.axes is None else self.axes

    @property
    def stacked(self) -> bool:
        return self.dims[0] == "layers"

    @property
    def lead(self) -> int:
        """Axes before the matmul's own: 1 (layers) for a stacked weight."""
        return 1 if self.stacked else 0

    @property
    def short(self) -> str:
        """The name inside its module: "q" for "layers.q" (LoRA targets are named so)."""
        return self.name.rpartition(".")[2]

    @property
    def quantized(self) -> bool:
        return self.layout is not None

    @property
    def lora(self) -> bool:
        return self.quantized and self.stacked


W = Weight
_VOCAB = ("vocab", "embed")
_NORM = ("layers", "embed")

TABLES: dict[str, tuple[Weight, ...]] = {
    # transformers' MistralForCausalLM, heads kept as an axis
    "mistral": (
        W("embed", _VOCAB, layout="nk"),
        W("layers.attn_norm", _NORM, "ones"),
        W("layers.q", ("layers", "embed", "heads", "head_dim"), layout="kn"),
        W("layers.k", ("layers", "embed", "kv_heads", "head_dim"), layout="kn"),
        W("layers.v", ("layers", "embed", "kv_heads", "head_dim"), layout="kn"),
        W("layers.o", ("layers", "heads", "head_dim", "embed"), layout="kn", inputs=2),
        W("layers.mlp_norm", _NORM, "ones"),
        W("layers.gate", ("layers", "embed", "mlp"), layout="kn"),
        W("layers.up", ("layers", "embed", "mlp"), layout="kn"),
        W("layers.down", ("layers", "mlp", "embed"), layout="kn"),
        W("norm", ("embed",), "ones"),
        W("lm_head", ("embed", "vocab"), layout="kn", unless="tie_word_embeddings"),
    ),
    # transformers' GPT2LMHeadModel, its fused c_attn split into q, k, v, heads kept as an axis
    "gpt2": (
        W("embed", _VOCAB, layout="nk"),
        W("pos_embed", ("positions", "embed"), axes=(None, "embed")),
        W("layers.ln1_scale", _NORM, "ones"),
        W("layers.ln1_bias", _NORM, "zeros"),
        *(w for name in "qkv" for w in (
            W(f"layers.{name}", ("layers", "embed", "heads", "head_dim"), layout="kn"),
            W(f"layers.{name}_bias", ("layers", "heads", "head_dim"), "zeros"))),
        W("layers.o", ("layers", "heads", "head_dim", "embed"), layout="kn", inputs=2),
        W("layers.o_bias", _NORM, "zeros"),
        W("layers.ln2_scale", _NORM, "ones"),
        W("layers.ln2_bias", _NORM, "zeros"),
        W("layers.fc", ("layers", "embed", "mlp"), layout="kn"),
        W("layers.fc_bias", ("layers", "mlp"), "zeros"),
        W("layers.proj", ("layers", "mlp", "embed"), layout="kn"),
        W("layers.proj_bias", _NORM, "zeros"),
        W("norm_scale", ("embed",), "ones"),
        W("norm_bias", ("embed",), "zeros"),
        W("lm_head", ("embed", "vocab"), layout="kn", unless="tie_word_embeddings"),
    ),
}

# Each axis name -> the config field that sizes it.
SIZES: dict[str, dict[str, str]] = {
    "mistral": {"vocab": "vocab_size", "embed": "hidden_size", "layers": "num_hidden_layers",
                "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                "head_dim": "head_dim", "mlp": "intermediate_size"},
    "gpt2": {"vocab": "vocab_size", "embed": "n_embd", "layers": "n_layer", "heads": "n_head",
             "head_dim": "head_dim", "mlp": "n_inner", "positions": "n_positions"},
}


def table(config: Config) -> tuple[Weight, ...]:
    """The weights a model of `config` has (an untied model's lm_head included)."""
    return tuple(w for w in TABLES[model_type(config)]
                 if w.unless is None or not getattr(config, w.unless))


def shape(weight: Weight, config: Config, vocab: int | None = None) -> tuple[int, ...]:
    """`weight`'s shape for `config`; `vocab`: the padded vocab, if it is padded."""
    fields = SIZES[model_type(config)]
    return tuple(vocab if d == "vocab" and vocab else getattr(config, fields[d])
                 for d in weight.dims)


@functools.cache
def matmuls(kind: str) -> dict[str, Weight]:
    """The matmul weights of a model kind ("mistral", "gpt2") by dotted name: the ones int8
    quantizes."""
    return {w.name: w for w in TABLES[kind] if w.quantized}


@functools.cache
def lora_targets(kind: str) -> dict[str, Weight]:
    """The weights LoRA may target, by short name ("q", "down")."""
    return {w.short: w for w in TABLES[kind] if w.lora}


@functools.cache
def sized_by(kind: str) -> dict[str, tuple[str, int]]:
    """Config field -> (the first weight that has an axis it sizes, that axis): how a config is
    read back off a checkpoint's shapes, to name the field the weights disagree with."""
    out = {}
    for w in TABLES[kind]:
        for axis, d in enumerate(w.dims):
            out.setdefault(SIZES[kind][d], (w.name, axis))
    return out
