"""Megatron-LM GPT-2 checkpoints -> our GPT-2 weights (the files are found and read by
convert/read/megatron_files.py: the NGC zip, a .pt file, or a checkpoint directory).

Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM") splits the column-parallel weights (fused
QKV, h -> 4h and its bias, word embeddings, output layer) on dim 0 and the row-parallel ones
(attention dense, 4h -> h) on dim 1; the rest is replicated. Pipeline stages (`mp_rank_XX_YYY`,
YYY the stage) hold consecutive slices of the layers, numbered from 0 in each stage.
`checkpoint_version` orders the fused QKV rows of each shard: 0 = [3, heads, hd], 1.0 =
[heads, hd, 3], >= 2.0 = [heads, 3, hd]. Each shard holds only its own heads, so its rows are
regrouped head-first before the shards are joined; that is right for every version.

Megatron pads the vocab (to a multiple of make_vocab_size_divisible_by x TP); with the GPT-2 BPE
files (`--vocab-file`, `--merge-file`) the padding rows are dropped.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from convert.mapping.conversion import Conversion
from convert.mapping.keymaps import KeyMap, key_pattern
from convert.mapping.layouts import (
    COLUMN,
    REPLICATED,
    ROW,
    SAME,
    Layout,
    join_shards,
    linear,
)
from convert.read import pages
from convert.read.errors import ConversionError, listed
from convert.read.megatron_files import Shard, dir_names, find_layout, read_shards, zip_names
from convert.read.sources import TensorSource, to_numpy
from mistral_jax.arch.configs import ConfigError, GPT2Config
from mistral_jax.text.tokenizer import Tokenizer

if TYPE_CHECKING:  # the shards are torch pickles: torch comes in when the first one is read
    import torch

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# Each weight's names across Megatron's versions: legacy (`language_model.{transformer|encoder}`,
# `attention` / `self_attention`, `*_layernorm` / `*_norm`), Megatron-Core (`decoder.`, `linear_*`,
# layer norms fused into the next linear when built with Transformer Engine) and legacy models
# built on Transformer Engine's TransformerLayer (`layernorm_qkv`, `layernorm_mlp`). "{e}" is the
# embedding's prefix, "{b}" the transformer's, "{l}" one layer's and "{o}" the model's.
SPELLINGS = {
    "embed": ["{e}word_embeddings.weight"],
    "pos_embed": ["{e}position_embeddings.weight"],
    "ln1_scale": ["{l}input_layernorm.weight", "{l}input_norm.weight",
                  "{l}self_attention.linear_qkv.layer_norm_weight",
                  "{l}self_attention.layernorm_qkv.layer_norm_weight"],
    "ln1_bias": ["{l}input_layernorm.bias", "{l}input_norm.bias",
                 "{l}self_attention.linear_qkv.layer_norm_bias",
                 "{l}self_attention.layernorm_qkv.layer_norm_bias"],
    "qkv": ["{l}self_attention.query_key_value.weight", "{l}attention.query_key_value.weight",
            "{l}self_attention.linear_qkv.weight", "{l}self_attention.layernorm_qkv.weight"],
    "qkv_bias": ["{l}self_attention.query_key_value.bias", "{l}attention.query_key_value.bias",
                 "{l}self_attention.linear_qkv.bias", "{l}self_attention.layernorm_qkv.bias"],
    "o": ["{l}self_attention.dense.weight", "{l}attention.dense.weight",
          "{l}self_attention.linear_proj.weight", "{l}self_attention.proj.weight"],
    "o_bias": ["{l}self_attention.dense.bias", "{l}attention.dense.bias",
               "{l}self_attention.linear_proj.bias", "{l}self_attention.proj.bias"],
    "ln2_scale": ["{l}post_attention_layernorm.weight", "{l}post_attention_norm.weight",
                  "{l}pre_mlp_layernorm.weight", "{l}mlp.linear_fc1.layer_norm_weight",
                  "{l}layernorm_mlp.layer_norm_weight"],
    "ln2_bias": ["{l}post_attention_layernorm.bias", "{l}post_attention_norm.bias",
                 "{l}pre_mlp_layernorm.bias", "{l}mlp.linear_fc1.layer_norm_bias",
                 "{l}layernorm_mlp.layer_norm_bias"],
    "fc": ["{l}mlp.dense_h_to_4h.weight", "{l}mlp.linear_fc1.weight",
           "{l}layernorm_mlp.fc1_weight"],
    "fc_bias": ["{l}mlp.dense_h_to_4h.bias", "{l}mlp.linear_fc1.bias", "{l}layernorm_mlp.fc1_bias"],
    "proj": ["{l}mlp.dense_4h_to_h.weight", "{l}mlp.linear_fc2.weight",
             "{l}layernorm_mlp.fc2_weight"],
    "proj_bias": ["{l}mlp.dense_4h_to_h.bias", "{l}mlp.linear_fc2.bias",
                  "{l}layernorm_mlp.fc2_bias"],
    "norm_scale": ["{b}final_layernorm.weight", "{b}final_norm.weight"],
    "norm_bias": ["{b}final_layernorm.bias", "{b}final_norm.bias"],
    "lm_head": ["{o}output_layer.weight"],
}
COLUMN_PARALLEL = {"embed", "fc", "fc_bias", "lm_head"}  # joined on dim 0
ROW_PARALLEL = {"o", "proj"}  # joined on dim 1
QKV = {"qkv", "qkv_bias"}  # regrouped head-first per shard, then joined on dim 0

# Megatron args that a GPT-2 leaves at these values; any other value is a model ours is not.
GPT2_ARGS = {"swiglu": False, "squared_relu": False, "add_bias_linear": True,
             "group_query_attention": False, "apply_residual_connection_post_layernorm": False,
             "position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
             "apply_layernorm_1p": False, "use_rotary_position_embeddings": False,
             "num_experts": None}
# Flags (and --megatron-config keys) for the sizes: Megatron's own argument names.
SIZES = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
         "ffn_hidden_size", "layernorm_epsilon")
# Megatron's tanh GELU, in all its spellings (openai_gelu, the fused bias_gelu kernel, and the
# 2019 code that predates both flags), is 0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2))):
# transformers' gelu_fast term for term (the constants are equal in float32; gelu_new groups
# the same terms differently). Without either flag Megatron calls F.gelu, the exact erf GELU.
TANH_GELU, ERF_GELU = "gelu_fast", "gelu"
GPT2_EOS, GPT2_EOS_ID = "<|endoftext|>", 50256


def add_arguments(group) -> None:
    group.add_argument("--vocab-file", metavar="FILE", help="Megatron: GPT-2 BPE vocab.json "
                       "(gives the tokenizer and the real vocab size; padding rows are dropped)")
    group.add_argument("--merge-file", metavar="FILE", help="Megatron: GPT-2 BPE merges.txt")
    group.add_argument("--megatron-config", metavar="FILE", help="Megatron: a JSON of the sizes "
                       "below (Megatron's names, e.g. num_attention_heads) and openai_gelu / "
                       "bias_gelu_fusion, for a checkpoint saved without args")
    for name in SIZES:
        group.add_argument("--" + name.replace("_", "-"), metavar="N",
                           type=float if "epsilon" in name else int,
                           help="Megatron: overrides the checkpoint's args")
    group.add_argument("--activation", choices=[ERF_GELU, TANH_GELU, "gelu_new"],
                       help="Megatron: the MLP activation (default: from args; the tanh GELU "
                       f"{TANH_GELU} for a checkpoint without args)")


DESCRIPTION = ("a Megatron-LM checkpoint: the NGC .zip, a .pt, or a directory of "
               "mp_rank_XX/model_optim_rng.pt")


def detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".pt" or (path.suffix == ".zip" and zipfile.is_zipfile(path)
                                        and find_layout(zip_names(path), path) is not None)
    return path.is_dir() and find_layout(dir_names(path), path) is not None


def _check_shards(stages: list[list[Shard]]) -> None:
    """Every shard of a checkpoint has the same version, the same keys as its stage's rank 0 and
    the same shape of every replicated tensor... or the message names the file that differs."""
    first = stages[0][0]
    for shard in (s for stage in stages for s in stage):
        if shard.version != first.version:
            raise ConversionError(f"{shard.where}: checkpoint_version {shard.version}, but "
                                  f"{first.where} has {first.version}")
        for name in SIZES + ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            mine, theirs = shard.args.get(name), first.args.get(name)
            if mine != theirs:
                raise ConversionError(f"{shard.where}: args.{name} = {mine}, but {first.where} "
                                      f"has {theirs}: shards of different checkpoints?")
    for stage in stages:
        for shard in stage[1:]:
            keys, ref = set(shard.tensors), set(stage[0].tensors)
            if keys != ref:
                diff = sorted(keys ^ ref)
                raise listed(f"{shard.where}: its tensors differ from {stage[0].where}'s "
                             "(shards of different checkpoints?)",
                             [*diff[:5], *["..."] * (len(diff) > 5)])
            for key in keys:
                a, b = shard.tensors[key].shape, stage[0].tensors[key].shape
                if a != b:
                    raise ConversionError(f"{shard.where}: {key} is {tuple(a)}, but "
                                          f"{tuple(b)} in {stage[0].where}")


# --- reading and merging the tensors ----------------------------------------------------------

class MegatronSource(TensorSource):
    """The tensors of every shard under global names: layers renumbered across pipeline stages,
    tensor-parallel shards joined as each weight was split."""

    def __init__(self, stages: list[list[Shard]], roles: dict[str, str], heads: int):
        super().__init__({})
        self.stages, self.heads, self.tp = stages, heads, len(stages[0])
        self.version = stages[0][0].version
        self.roles = [(key_pattern(k), role) for k, role in roles.items()]
        self.where: dict[str, tuple[int, str]] = {}  # global key -> (stage, key in the stage)
        offset = 0
        for p, stage in enumerate(stages):
            local = [int(m[1]) for k in stage[0].tensors if (m := LAYER.search(k))]
            for key in stage[0].tensors:
                self.where[_renumber(key, offset)] = (p, key)
            offset += 1 + max(local, default=-1)
        self.files_by_key = dict.fromkeys(self.where)  # keys(); no files of our own

    def get(self, key: str) -> np.ndarray:
        p, local = self.where[key]
        parts = [to_numpy(shard.tensors[local]) for shard in self.stages[p]]
        role = next((role for pattern, role in self.roles if pattern.match(key)), None)
        if role in QKV:
            parts = [self._heads_first(w, key) for w in parts]
        split = ROW if role in ROW_PARALLEL else COLUMN if role in QKV | COLUMN_PARALLEL \
            else REPLICATED
        return join_shards(parts, split)

    def _heads_first(self, w: np.ndarray, key: str) -> np.ndarray:
        """One shard's fused QKV rows as [local heads * 3 * hd] (version 2's order)."""
        n, rest = self.heads // self.tp, w.shape[1:]
        try:
            if self.version < 1:  # [3, n, hd]
                w = w.reshape(3, n, -1, *rest).swapaxes(0, 1)
            elif self.version < 2:  # [n, hd, 3]
                w = w.reshape(n, -1, 3, *rest).swapaxes(1, 2)
            return w.reshape(-1, *rest)
        except ValueError:
            raise ConversionError(f"{key}: {w.shape[0]} rows per shard are not 3 x "
                                  f"{n} heads x head_dim") from None

    def release(self, key: str) -> None:
        p, local = self.where[key]
        for shard in self.stages[p]:
            pages.release_tensor(shard.tensors[local])


def _renumber(key: str, offset: int) -> str:
    if not offset:
        return key
    return LAYER.sub(lambda m: m[0].replace(m[1], str(int(m[1]) + offset)), key, count=1)


# --- what the tensors mean --------------------------------------------------------------------

def _spelling(keys: list[str], where: str) -> dict[str, str]:
    """Each role's key (with "{i}" for the layer) as this checkpoint spells it."""
    embed = next((k for k in keys if k.endswith(".word_embeddings.weight")
                  or k == "word_embeddings.weight"), None)
    layer = next((m for k in keys if (m := re.match(r"(.*?)layers\.\d+\.", k))), None)
    if embed is None or layer is None:
        raise ConversionError(f"{where}: no word embeddings or no transformer layers: not a "
                              "Megatron GPT model")
    e = embed[: -len("word_embeddings.weight")]
    prefixes = {"e": e, "b": layer[1], "l": layer[1] + "layers.{i}.",
                "o": e.removesuffix("embedding.")}
    present = {LAYER.sub(".layers.{i}.", k, count=1).lstrip(".") for k in keys}
    roles = {}
    for role, names in SPELLINGS.items():
        names = [n.format_map(prefixes) for n in names]
        found = next((n for n in names if n in present), None)
        if found or role != "lm_head":
            roles[role] = found or names[0]
    return roles


def keymap(c: GPT2Config, roles: dict[str, str]) -> KeyMap:
    """Source key -> our weight(s): QKV rows arrive as [heads, 3, hd] (version 2's order). Read
    only: export writes HF's format, not Megatron's."""
    d, n, h, v = c.n_embd, c.n_head, c.head_dim, c.vocab_size
    ours = {
        "embed": ("embed", Layout(lambda w: w[:v])),  # the vocab padding rows go
        "pos_embed": ("pos_embed", SAME),
        "ln1_scale": ("layers.ln1_scale", SAME), "ln1_bias": ("layers.ln1_bias", SAME),
        "qkv": (("layers.q", "layers.k", "layers.v"), Layout(
            lambda w: tuple(w.reshape(n, 3, h, d)[:, j].transpose(2, 0, 1) for j in range(3)))),
        "qkv_bias": (("layers.q_bias", "layers.k_bias", "layers.v_bias"), Layout(
            lambda b: tuple(b.reshape(n, 3, h)[:, j] for j in range(3)))),
        "o": ("layers.o", linear(c, "layers.o")),
        "o_bias": ("layers.o_bias", SAME),
        "ln2_scale": ("layers.ln2_scale", SAME), "ln2_bias": ("layers.ln2_bias", SAME),
        "fc": ("layers.fc", linear(c, "layers.fc")), "fc_bias": ("layers.fc_bias", SAME),
        "proj": ("layers.proj", linear(c, "layers.proj")), "proj_bias": ("layers.proj_bias", SAME),
        "norm_scale": ("norm_scale", SAME), "norm_bias": ("norm_bias", SAME),
        "lm_head": ("lm_head", Layout(lambda w: w[:v].T)),
    }
    return {key: ours[role] for role, key in roles.items()}


def read_config(stages: list[list[Shard]], roles: dict[str, str], where: Path, *,
                megatron_config=None, activation=None, **flags) -> tuple[dict, list[str]]:
    """GPT2Config fields from the args, a --megatron-config file, flags and tensor shapes (in
    rising precedence; shapes only fill what none of the others gives)."""
    first, notes = stages[0][0], []
    args = dict(first.args)
    args.setdefault("layernorm_epsilon", args.get("norm_epsilon"))  # its newer name
    if megatron_config:
        try:
            args.update(json.loads(Path(megatron_config).read_text()))
        except (OSError, ValueError) as e:
            raise ConversionError(f"{megatron_config}: not a readable JSON file ({e})") from None
    args.update({k: v for k, v in flags.items() if v is not None})
    for name, default in GPT2_ARGS.items():
        if args.get(name, default) != default:
            raise ConversionError(f"{first.where}: args.{name} = {args[name]!r}; a GPT-2 has "
                                  f"{default!r}, and mistral_jax's GPT-2 cannot represent it")
    shape = lambda role: tuple(_find(stages, roles[role]).shape)  # noqa: E731
    inferred = {  # what the tensors tell, asked only for what nothing else gave
        "num_layers": lambda: sum(1 + max((int(m[1]) for k in s[0].tensors
                                           if (m := LAYER.search(k))), default=-1)
                                  for s in stages),
        "hidden_size": lambda: shape("embed")[1],
        "max_position_embeddings": lambda: shape("pos_embed")[0],
        "ffn_hidden_size": lambda: shape("fc")[0] * len(stages[0])}
    for name, value in inferred.items():
        if args.get(name) is None:
            args[name] = value()
    heads = args.get("num_attention_heads")
    if heads is None:
        raise ConversionError(f"{where}: the checkpoint has no args, so the number of attention "
                              "heads is unknown: pass --num-attention-heads N (or a "
                              "--megatron-config JSON with num_attention_heads)")
    if args.get("kv_channels") not in (None, args["hidden_size"] // heads):
        raise ConversionError(f"{first.where}: args.kv_channels = {args['kv_channels']}, not "
                              "hidden_size / num_attention_heads as in a GPT-2")
    if args.get("layernorm_epsilon") is None:
        args["layernorm_epsilon"] = 1e-5
        notes.append("no layernorm_epsilon given; using Megatron's default 1e-5")
    if activation is None:
        activation = _activation(args)
        if activation is None:
            activation = TANH_GELU
            notes.append("the checkpoint does not say which GELU it used (no openai_gelu / "
                         f"bias_gelu_fusion); taking Megatron's tanh GELU ({TANH_GELU}), which "
                         "the code that saved no args used; --activation gelu for erf GELU")
    return {"n_layer": int(args["num_layers"]), "n_embd": int(args["hidden_size"]),
            "n_head": int(heads), "n_positions": int(args["max_position_embeddings"]),
            "n_inner": int(args["ffn_hidden_size"]),
            "layer_norm_epsilon": float(args["layernorm_epsilon"]),
            "activation_function": activation}, notes


def _activation(args: dict) -> str | None:
    """Megatron's MLP activation as transformers names it; None when args do not say. Either
    tanh flag gives the tanh GELU (which one wins changed across versions; both compute the
    same); without them, F.gelu (or onnx_safe's erf form of it)."""
    if args.get("openai_gelu") or args.get("bias_gelu_fusion"):
        return TANH_GELU
    if any(k in args for k in ("openai_gelu", "bias_gelu_fusion", "onnx_safe")):
        return ERF_GELU
    return None


def _find(stages: list[list[Shard]], key: str) -> torch.Tensor:
    pattern = key_pattern(key)
    for stage in stages:
        for k, t in stage[0].tensors.items():
            if pattern.match(k):
                return t
    raise ConversionError(f"{stages[0][0].where}: no tensor {key}")


def _tied(stages: list[list[Shard]], roles: dict[str, str]) -> bool:
    """Is the LM head the word embedding? A tied model may still hold a synced copy of it on the
    last pipeline stage (output_layer / word_embeddings_for_head)."""
    args = stages[0][0].args
    if "untie_embeddings_and_output_weights" in args:
        return not args["untie_embeddings_and_output_weights"]
    if "lm_head" not in roles:
        return True
    if len(stages) == 1:
        return False
    import torch  # (loaded already: the shards are torch pickles)

    return bool(torch.equal(_find(stages, roles["lm_head"]), _find(stages, roles["embed"])))


def conversion(path: Path, *, vocab_file=None, merge_file=None, **options) -> Conversion:
    """How the Megatron checkpoint `path` maps onto our GPT-2 weights."""
    stages = read_shards(Path(path))
    _check_shards(stages)
    keys = [k for stage in stages for k in stage[0].tensors]
    roles = _spelling(keys, stages[0][0].where)
    fields, notes = read_config(stages, roles, path, **options)
    tp = len(stages[0])
    padded = tuple(_find(stages, roles["embed"]).shape)[0] * tp
    tokenizer = None
    if (vocab_file is None) != (merge_file is None):
        raise ConversionError("--vocab-file and --merge-file go together (GPT-2 BPE)")
    if vocab_file is not None:
        try:
            tokenizer = Tokenizer.from_bpe_files(vocab_file, merge_file)
        except (ValueError, OSError) as e:
            raise ConversionError(str(e)) from None
        if tokenizer.vocab_size > padded:
            raise ConversionError(f"{vocab_file}: {tokenizer.vocab_size} tokens, but the "
                                  f"checkpoint's embedding has only {padded} rows")
    else:
        notes.append(f"no --vocab-file/--merge-file: keeping Megatron's padded vocab of {padded} "
                     "rows (ids past the tokenizer's are padding) and no tokenizer")
    vocab = tokenizer.vocab_size if tokenizer else padded
    eos = tokenizer.piece_to_id(GPT2_EOS) if tokenizer else GPT2_EOS_ID if padded > GPT2_EOS_ID \
        else None
    tied = _tied(stages, roles)
    if tied:
        roles.pop("lm_head", None)
    try:
        config = GPT2Config(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos,
                            tie_word_embeddings=tied, **fields)
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None
    if config.n_head % tp:
        raise ConversionError(f"{path}: {config.n_head} heads do not split over {tp} TP shards")
    source = MegatronSource(stages, {k: role for role, k in roles.items()}, config.n_head)
    ignore = [k for k in source.keys() if k.endswith("word_embeddings_for_head.weight")
              or (tied and k.endswith("output_layer.weight"))]
    return Conversion(config, source, keymap(config, roles), ignore, tokenizer, notes,
                      origin=str(path))
