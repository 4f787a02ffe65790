"""Megatron-LM GPT-2 checkpoints as Megatron writes them, for tests/test_megatron*.py: random
weights in its layout, their split into tensor-parallel and pipeline shards, every checkpoint
version's QKV layout and names, and a torch forward written from that layout; and our logits
from a Megatron folder through the conversion."""

import argparse
import contextlib
import io
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mistral_jax
from convert import from_torch
from convert.formats import megatron
from convert.read import megatron_files
from mistral_jax.base import trees
from mistral_jax.model import registry as models

D, HEADS, FFN, LAYERS, POSITIONS, PADDED = 64, 4, 256, 4, 32, 384
HD = D // HEADS
IDS = np.random.default_rng(0).integers(0, 300, (2, 12))


# --- Megatron's side: weights, their split into shards, and its forward -----------------------

def megatron_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random GPT-2 as Megatron's language_model holds it (legacy names, `encoder.`)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    w = {"embedding.word_embeddings.weight": r(PADDED, D),
         "embedding.position_embeddings.weight": r(POSITIONS, D)}
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + r(D), p + "input_layernorm.bias": r(D),
              p + "self_attention.query_key_value.weight": r(3 * D, D),
              p + "self_attention.query_key_value.bias": r(3 * D),
              p + "self_attention.dense.weight": r(D, D), p + "self_attention.dense.bias": r(D),
              p + "post_attention_layernorm.weight": 1 + r(D),
              p + "post_attention_layernorm.bias": r(D),
              p + "mlp.dense_h_to_4h.weight": r(FFN, D), p + "mlp.dense_h_to_4h.bias": r(FFN),
              p + "mlp.dense_4h_to_h.weight": r(D, FFN), p + "mlp.dense_4h_to_h.bias": r(D)}
    return w | {"encoder.final_layernorm.weight": 1 + r(D), "encoder.final_layernorm.bias": r(D)}


def qkv_axes(version: float) -> tuple[tuple[int, int, int], int, int]:
    """How `version` lays out the fused QKV rows: the shape, the heads' axis and q|k|v's axis."""
    if version < 1:
        return (3, -1, HD), 1, 0  # [3, heads, hd]
    if version < 2:
        return (-1, HD, 3), 0, 2  # [heads, hd, 3]
    return (-1, 3, HD), 0, 1  # [heads, 3, hd]


def tanh_gelu(x):  # Megatron's fused bias_gelu / openai_gelu
    return 0.5 * x * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def megatron_forward(w: dict, version: float, gelu, ids, output_layer=None) -> np.ndarray:
    """Megatron's GPT-2 forward from its own tensors: logits over the padded vocab."""
    ids = torch.tensor(ids)
    b, t = ids.shape
    ln = lambda x, p: F.layer_norm(x, (D,), w[p + ".weight"], w[p + ".bias"], 1e-5)  # noqa: E731
    x = w["embedding.word_embeddings.weight"][ids] + w["embedding.position_embeddings.weight"][:t]
    mask = torch.full((t, t), float("-inf")).triu(1)
    shape, _, qkv_axis = qkv_axes(version)
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        a = p + "self_attention."
        qkv = ln(x, p + "input_layernorm") @ w[a + "query_key_value.weight"].T \
            + w[a + "query_key_value.bias"]
        q, k, v = qkv.view(b, t, *shape).unbind(2 + qkv_axis)  # the version's row order
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [b, heads, t, hd]
        att = torch.softmax(q @ k.transpose(-1, -2) / HD**0.5 + mask, -1) @ v
        x = x + att.transpose(1, 2).reshape(b, t, D) @ w[a + "dense.weight"].T \
            + w[a + "dense.bias"]
        h = ln(x, p + "post_attention_layernorm") @ w[p + "mlp.dense_h_to_4h.weight"].T \
            + w[p + "mlp.dense_h_to_4h.bias"]
        x = x + gelu(h) @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]
    head = w["embedding.word_embeddings.weight"] if output_layer is None else output_layer
    return (ln(x, "encoder.final_layernorm") @ head.T).numpy()


def split_tp(w: dict, version: float, tp: int) -> list[dict]:
    """Megatron's tensor-parallel shards: each rank holds its heads' QKV rows in the version's
    order, column-parallel weights split on dim 0, row-parallel on dim 1."""
    shape, heads_axis, _ = qkv_axes(version)
    ranks = [{} for _ in range(tp)]
    for k, v in w.items():
        if "query_key_value" in k:
            parts = [x.reshape(-1, *v.shape[1:])
                     for x in v.reshape(*shape, *v.shape[1:]).chunk(tp, dim=heads_axis)]
        elif k.endswith(("dense_h_to_4h.weight", "dense_h_to_4h.bias", "word_embeddings.weight",
                         "word_embeddings_for_head.weight",
                         "output_layer.weight")):
            parts = v.chunk(tp, dim=0)
        elif k.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
            parts = v.chunk(tp, dim=1)
        else:
            parts = [v] * tp
        for rank, part in zip(ranks, parts, strict=True):
            rank[k] = part.clone()
    return ranks


def split_pp(w: dict, pp: int) -> list[dict]:
    """Pipeline stages: consecutive layers, numbered from 0 in each stage; the embedding on the
    first stage, the final norm (and a copy of the tied head) on the last."""
    per = LAYERS // pp
    stages = [{} for _ in range(pp)]
    for k, v in w.items():
        if ".layers." in k:
            i = int(k.split(".layers.")[1].split(".")[0])
            stage, local = divmod(i, per)
            stages[stage][k.replace(f".layers.{i}.", f".layers.{local}.")] = v
        elif k.startswith("embedding."):
            stages[0][k] = v
        else:
            stages[-1][k] = v
    if pp > 1:
        stages[-1]["word_embeddings_for_head.weight"] = w["embedding.word_embeddings.weight"]
    return stages


CORE_NAMES = {  # legacy -> Megatron-Core (Transformer Engine layers: layer norms fused)
    "embedding.": "embedding.", "encoder.final_layernorm": "decoder.final_layernorm",
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "post_attention_layernorm.": "mlp.linear_fc1.layer_norm_",
    "mlp.dense_h_to_4h": "mlp.linear_fc1", "mlp.dense_4h_to_h": "mlp.linear_fc2",
    "encoder.layers": "decoder.layers", "word_embeddings_for_head": "output_layer",
}
OLD_NAMES = {"encoder.": "transformer.", "self_attention.": "attention."}  # Megatron of 2019-20
TE_NAMES = {  # legacy Megatron built on Transformer Engine's TransformerLayer
    "input_layernorm.": "self_attention.layernorm_qkv.layer_norm_",
    "self_attention.query_key_value.": "self_attention.layernorm_qkv.",
    "self_attention.dense.": "self_attention.proj.",
    "post_attention_layernorm.": "layernorm_mlp.layer_norm_",
    "mlp.dense_h_to_4h.": "layernorm_mlp.fc1_", "mlp.dense_4h_to_h.": "layernorm_mlp.fc2_",
    "final_layernorm": "final_norm",
}


def rename(w: dict, names: dict) -> dict:
    out = {}
    for k, v in w.items():
        for a, b in names.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def megatron_args(tp: int = 1, pp: int = 1, **overrides) -> argparse.Namespace:
    return argparse.Namespace(**{
        "num_layers": LAYERS, "hidden_size": D, "num_attention_heads": HEADS,
        "max_position_embeddings": POSITIONS, "ffn_hidden_size": FFN, "layernorm_epsilon": 1e-5,
        "padded_vocab_size": PADDED, "make_vocab_size_divisible_by": 128,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "openai_gelu": False, "bias_gelu_fusion": False, "onnx_safe": None,
        "params_dtype": torch.float32, "fp16": False, "seq_length": POSITIONS, **overrides})


def save_megatron(root: Path, w: dict, version: float, *, tp: int = 1, pp: int = 1,
                  args: argparse.Namespace | None | bool = True, names: str = "legacy",
                  iteration: str = "iter_0000100", legacy_pickle: bool = False) -> Path:
    """Write `w` as Megatron saves it: <root>/<iteration>/mp_rank_XX[_YYY]/model_optim_rng.pt
    and latest_checkpointed_iteration.txt."""
    if args is True:
        args = megatron_args(tp, pp)
    for p, stage in enumerate(split_pp(w, pp)):
        for t, shard in enumerate(split_tp(stage, version, tp)):
            if names == "core":
                model = rename(shard, CORE_NAMES)
            else:
                shard = rename(shard, {"old": OLD_NAMES, "te": TE_NAMES}.get(names, {}))
                body = {k: v for k, v in shard.items() if not k.startswith("embedding.")}
                model = {"language_model": {
                    "embedding": {k.split(".")[1]: {"weight": v} for k, v in shard.items()
                                  if k.startswith("embedding.")},
                    **{"transformer" if names == "old" else "encoder":
                       {k.split(".", 1)[1]: v for k, v in body.items()
                        if k.startswith(("encoder.", "transformer."))}}}}
                if "word_embeddings_for_head.weight" in shard:
                    model["word_embeddings_for_head"] = {
                        "weight": shard["word_embeddings_for_head.weight"]}
            ckpt = {"model": model, "iteration": 100, "rng_state": [{
                "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]}
            if args:
                ckpt["args"] = args
            if version:
                ckpt["checkpoint_version"] = version
            rank = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            (root / iteration / rank).mkdir(parents=True, exist_ok=True)
            torch.save(ckpt, root / iteration / rank / "model_optim_rng.pt",
                       _use_new_zipfile_serialization=not legacy_pickle)
    (root / megatron_files.TRACKER).write_text(iteration.removeprefix("iter_").lstrip("0") or "0")
    if iteration == "release":
        (root / megatron_files.TRACKER).write_text("release")
    return root


# --- our side ---------------------------------------------------------------------------------

def ours(src, **options):
    """Our logits for IDS from `src`, converted in memory through the Megatron conversion."""
    conversion = megatron.conversion(Path(src), **options)
    model = trees.with_weights(models.abstract(conversion.config), conversion.weights())
    return np.asarray(mistral_jax.forward(model, IDS)), conversion


def fails(src, out: Path, *flags, match: str) -> str:
    """The command line refuses `src` with exit 1 and a message matching `match`; no OUT."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert from_torch.main([str(src), str(out), "--no-progress", *flags]) == 1
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    message = err.getvalue()
    assert re.search(match, message), message
    return message
