"""Model configs: frozen dataclasses mirroring Hugging Face's MistralConfig and GPT2Config.

Field names and defaults follow transformers, so a `config.json` written by transformers reads
back here unchanged and ours loads in transformers. Presets: `preset("mistral-7b")` and others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

# The activations a config may name; nn/layers.py maps each name to its function.
ACTIVATIONS = ("silu", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class ConfigError(ValueError):
    """A config.json or preset that this project cannot represent faithfully."""


@dataclass(frozen=True)
class MistralConfig:
    """Mistral / Llama decoder. `sliding_window=None` means full causal attention (Llama)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    attention_dropout: float = 0.0

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               f"num_attention_heads={self.num_attention_heads} is not a multiple of "
               f"num_key_value_heads={self.num_key_value_heads}")
        _check(self.hidden_act in ACTIVATIONS,
               f"hidden_act={self.hidden_act!r} is not one of {ACTIVATIONS}")
        _check(self.sliding_window is None or self.sliding_window > 0,
               f"sliding_window={self.sliding_window} must be a positive int or None")

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    # RoPE has no table to overrun: positions past max_position_embeddings only warn
    learned_positions = None

    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 and Megatron GPT-2: learned positions, pre-LayerNorm, GELU MLP, biases everywhere."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.n_inner is None:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        _check(self.n_embd % self.n_head == 0,
               f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        _check(self.activation_function in ACTIVATIONS,
               f"activation_function={self.activation_function!r} is not one of {ACTIVATIONS}")

    # The names both decoders share, so code that needs sizes need not know the model type.
    hidden_size = property(lambda self: self.n_embd)
    num_attention_heads = property(lambda self: self.n_head)
    num_key_value_heads = property(lambda self: self.n_head)
    head_dim = property(lambda self: self.n_embd // self.n_head)
    intermediate_size = property(lambda self: self.n_inner)
    n_layers = property(lambda self: self.n_layer)
    max_position_embeddings = property(lambda self: self.n_positions)
    learned_positions = property(lambda self: self.n_positions)  # the table: no position beyond
    sliding_window = None

    def num_params(self) -> int:
        d, f = self.n_embd, self.n_inner
        layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return (self.vocab_size + self.n_positions) * d + self.n_layer * layer + 2 * d + head


Config = MistralConfig | GPT2Config


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


PRESETS: dict[str, Config] = {
    # Mistral-7B-v0.1: 7.24B parameters.
    "mistral-7b": MistralConfig(),
    # NVIDIA's megatron_lm_345m: 24 layers, 1024 wide, 16 heads; 355M parameters with its tied
    # embeddings (vocab padded to 50304 by Megatron, cut to GPT-2's 50257 on conversion) and
    # Megatron's tanh GELU, which is transformers' gelu_fast term for term.
    "megatron-gpt2-345m": GPT2Config(n_embd=1024, n_layer=24, n_head=16,
                                     activation_function="gelu_fast", n_positions=1024),
    # OpenAI GPT-2 small: 124M parameters.
    "gpt2": GPT2Config(),
    # A small 4-layer Mistral (no window): 20.3M parameters with vocab 8000.
    "mistral-20m": MistralConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536,
                                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                 head_dim=64, sliding_window=None, max_position_embeddings=2048),
    # Tiny configs for tests: a few thousand parameters, a window of 8 so sequences span windows.
    "mistral-tiny": MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  sliding_window=8, max_position_embeddings=256),
    "gpt2-tiny": GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- Hugging Face config.json ------------------------------------------------------------------

_UNSUPPORTED = {  # config.json keys whose non-default values this implementation does not follow
    "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
    "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
    "scale_attn_weights": True, "add_cross_attention": False,
}


def from_hf_dict(d: dict[str, Any]) -> Config:
    """A config from a transformers `config.json` dict (mistral, llama or gpt2 model_type)."""
    model_type = d.get("model_type")
    if model_type not in ("mistral", "llama", "gpt2"):
        raise ConfigError(f"unknown model_type {model_type!r} in config.json; "
                          "supported: 'mistral', 'llama', 'gpt2'")
    for key, default in _UNSUPPORTED.items():
        if d.get(key, default) != default:
            raise ConfigError(f"config.json sets {key}={d[key]!r}, which mistral_jax does not "
                              f"implement (only {key}={default!r})")
    d = dict(d)
    rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)
    if rope:
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"config.json asks for RoPE scaling {rope}; only plain RoPE is "
                              "implemented")
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
    cls = GPT2Config if model_type == "gpt2" else MistralConfig
    if model_type == "llama":
        d["sliding_window"] = None
    if d.get("use_sliding_window") is False:  # Qwen-style switch, honoured when present
        d["sliding_window"] = None
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(kwargs.get(k), list):  # several EOS ids: the first is the one we stop on
            kwargs[k] = kwargs[k][0]
    return cls(**kwargs)


def model_type(config: Config) -> str:
    """"mistral" or "gpt2": the `model_type` of the config.json we write."""
    return "gpt2" if isinstance(config, GPT2Config) else "mistral"


def to_hf_dict(config: Config) -> dict[str, Any]:
    """The `config.json` dict transformers reads back as the same model."""
    d = dataclasses.asdict(config)
    if isinstance(config, MistralConfig):  # a Llama is written as the Mistral it equals
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
        return {"model_type": "mistral", "architectures": ["MistralForCausalLM"], **d}
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **d}
