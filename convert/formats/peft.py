"""LoRA adapters -> PEFT's folder (adapter_config.json + adapter_model.safetensors), which
`peft.PeftModel.from_pretrained(base, OUT)` loads onto the base model `convert.to_torch` exports.

PEFT keeps A as `lora_A.weight` [r, in] and B as `lora_B.weight` [out, r] on the torch module it
adapts, the module's output growing by (alpha / r) x A^T B^T. GPT-2 fuses q|k|v into one Conv1D
(`c_attn`), so adapters of q, k and v become one adapter of `c_attn` whose A stacks theirs and
whose B is block-diagonal, of rank (number of them) x r; `rank_pattern` / `alpha_pattern` scale
its alpha with it, so alpha / r stays what was trained.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from mistral_jax.io import files, lora

# our weight -> the torch module it lives in ("{i}": the layer)
MODULES = {
    "mistral": {"q": "model.layers.{i}.self_attn.q_proj", "k": "model.layers.{i}.self_attn.k_proj",
                "v": "model.layers.{i}.self_attn.v_proj", "o": "model.layers.{i}.self_attn.o_proj",
                "gate": "model.layers.{i}.mlp.gate_proj", "up": "model.layers.{i}.mlp.up_proj",
                "down": "model.layers.{i}.mlp.down_proj"},
    "gpt2": {"q": "transformer.h.{i}.attn.c_attn", "k": "transformer.h.{i}.attn.c_attn",
             "v": "transformer.h.{i}.attn.c_attn", "o": "transformer.h.{i}.attn.c_proj",
             "fc": "transformer.h.{i}.mlp.c_fc", "proj": "transformer.h.{i}.mlp.c_proj"},
}
FUSED = ("q", "k", "v")  # GPT-2's c_attn, in its order


def _target_module(module: str) -> str:
    """The suffix PEFT matches a module name by: "q_proj", "attn.c_proj", "c_fc"."""
    parts = module.split(".")
    return parts[-1] if parts[-1] not in ("c_proj",) else ".".join(parts[-2:])


def peft_tensors(kind: str, arrays: dict, layers: int) -> dict[str, np.ndarray]:
    """PEFT's state dict from our {"layers": {name: {"a": [L, *in, r], "b": [L, r, *out]}}}."""
    out: dict[str, np.ndarray] = {}
    ab = arrays["layers"]
    for i in range(layers):
        fused = [n for n in FUSED if n in ab] if kind == "gpt2" else []
        for name, pair in ab.items():
            if name in fused:
                continue
            a, b = np.asarray(pair["a"][i]), np.asarray(pair["b"][i])
            r = a.shape[-1]
            key = "base_model.model." + MODULES[kind][name].format(i=i)
            out[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
            out[key + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        if fused:
            a_parts = [np.asarray(ab[n]["a"][i]) for n in fused]  # [d, r] each
            r, d = a_parts[0].shape[-1], a_parts[0].shape[0]
            block = np.zeros((3 * d, r * len(fused)), np.float32)
            for p, name in enumerate(fused):
                j = FUSED.index(name)
                block[j * d:(j + 1) * d, p * r:(p + 1) * r] = np.asarray(
                    ab[name]["b"][i]).reshape(r, d).T
            key = "base_model.model." + MODULES[kind]["q"].format(i=i)
            out[key + ".lora_A.weight"] = np.ascontiguousarray(
                np.concatenate([a.T for a in a_parts]))
            out[key + ".lora_B.weight"] = block
    return out


def peft_config(kind: str, info: dict, base_model: str | None = None) -> dict:
    """adapter_config.json for PEFT's LoraConfig; `base_model` the Hugging Face model it
    names as its base (None: none named)."""
    targets = info["targets"]
    modules = sorted({_target_module(MODULES[kind][t]) for t in targets})
    fused = [t for t in FUSED if t in targets] if kind == "gpt2" else []
    rank_pattern, alpha_pattern = {}, {}
    if len(fused) > 1:
        rank_pattern["c_attn"] = info["rank"] * len(fused)
        alpha_pattern["c_attn"] = info["alpha"] * len(fused)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": info["rank"],
            "lora_alpha": info["alpha"], "target_modules": modules, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": kind == "gpt2",  # GPT-2's Conv1D is [in, out]
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "base_model_name_or_path": base_model, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
            "use_dora": False}


def export(adapters: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
           base_model: str | None = None) -> Path:
    """Write the PEFT folder `out` for our adapters directory `adapters`. `base_model` (a Hub
    id or a Hugging Face folder: the base exported by `convert.to_torch`, or what it was
    converted from) is the base adapter_config.json names; without it none is named, and a
    note says how to name one."""
    out = files.check_new(out, overwrite)
    info = lora.read_info(adapters)
    if base_model is not None:
        check_base_model(base_model, info)
    kind = info.get("model_type", "mistral")
    unknown = [t for t in info["targets"] if t not in MODULES[kind]]
    if unknown:
        raise lora.LoraError(f"{adapters}: targets {unknown} have no {kind} module in PEFT")
    stored = files.stored_shapes(Path(adapters) / files.WEIGHTS)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = files.read_arrays(Path(adapters) / files.WEIGHTS, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), stored))
    layers = next(iter(arrays["layers"].values()))["a"].shape[0]
    tensors = peft_tensors(kind, arrays, layers)
    with files.atomic_directory(out, overwrite=overwrite) as tmp:
        files.write_json(tmp / "adapter_config.json", peft_config(kind, info, base_model))
        save_file({k: v.astype(np.float32) for k, v in tensors.items()},
                  tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        files.as_new_file(tmp / "adapter_model.safetensors")
    if base_model is None:
        base = info.get("base") or "BASE"
        print(f"note: {out / 'adapter_config.json'} names no base model "
              "(base_model_name_or_path: null), as the adapters' base is a mistral_jax "
              f"checkpoint that transformers cannot load; export it (python -m convert.to_torch "
              f"{base} hf-base/) and pass --base-model hf-base/ (or the Hub id it came from), "
              "or give PeftModel.from_pretrained the base model yourself", file=sys.stderr)
    return out


# config.json sizes that must agree between the adapters' base and the model named as it
SIZES = ("hidden_size", "num_hidden_layers", "n_embd", "n_layer")


def check_base_model(name: str, info: dict) -> None:
    """`name` is something transformers can load as the adapters' base: not one of our
    checkpoints, and, when it is a local folder, a Hugging Face one of the same sizes."""
    path = Path(name)
    if not path.exists():
        return  # a Hub id (or a folder still to be written): transformers resolves it
    if (path / "config.json").is_file() and (path / files.WEIGHTS).is_dir():
        raise lora.LoraError(f"--base-model {name} is a mistral_jax checkpoint, which "
                             "transformers cannot load: export it first (python -m "
                             f"convert.to_torch {name} hf-base/) and name the export")
    if not (path / "config.json").is_file():
        raise lora.LoraError(f"--base-model {name} is not a Hugging Face model folder (it has "
                             "no config.json); name the base's export or its Hub id")
    theirs = json.loads((path / "config.json").read_text())
    ours = info.get("base_config") or {}
    differ = [f"{k} {theirs[k]} there, {ours[k]} in the adapters' base" for k in SIZES
              if k in theirs and k in ours and theirs[k] != ours[k]]
    if differ:
        raise lora.LoraError(f"--base-model {name} is not the adapters' base: "
                             + "; ".join(differ))
