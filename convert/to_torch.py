"""`python -m convert.to_torch CKPT OUT`: a mistral_jax checkpoint -> a Hugging Face folder
(config.json + model.safetensors + tokenizer files) that `AutoModelForCausalLM.from_pretrained`
loads with the same logits. The inverse of `convert/hf.py`'s key maps, one layer at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

import jax
import numpy as np
import torch
from safetensors.torch import save_file

import mistral_jax
from convert.cli import report
from mistral_jax import models
from mistral_jax.configs import GPT2Config, to_hf_dict


def mistral_tensors(c, w: dict) -> dict[str, np.ndarray]:
    d = c.hidden_size
    out = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"]}
    if w.get("lm_head") is not None:
        out["lm_head.weight"] = w["lm_head"].T
    lw = w["layers"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = lw["attn_norm"][i]
        out[p + "post_attention_layernorm.weight"] = lw["mlp_norm"][i]
        for name in ("q", "k", "v"):  # ours [d, heads, h] -> torch [heads * h, d]
            out[p + f"self_attn.{name}_proj.weight"] = lw[name][i].reshape(d, -1).T
        out[p + "self_attn.o_proj.weight"] = lw["o"][i].reshape(-1, d).T
        out[p + "mlp.gate_proj.weight"] = lw["gate"][i].T
        out[p + "mlp.up_proj.weight"] = lw["up"][i].T
        out[p + "mlp.down_proj.weight"] = lw["down"][i].T
    return out


def gpt2_tensors(c: GPT2Config, w: dict) -> dict[str, np.ndarray]:
    d = c.n_embd
    out = {"transformer.wte.weight": w["embed"], "transformer.wpe.weight": w["pos_embed"],
           "transformer.ln_f.weight": w["norm_scale"], "transformer.ln_f.bias": w["norm_bias"]}
    if w.get("lm_head") is not None:
        out["lm_head.weight"] = w["lm_head"].T
    lw = w["layers"]
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        out[p + "ln_1.weight"], out[p + "ln_1.bias"] = lw["ln1_scale"][i], lw["ln1_bias"][i]
        out[p + "ln_2.weight"], out[p + "ln_2.bias"] = lw["ln2_scale"][i], lw["ln2_bias"][i]
        # Conv1D keeps [in, out]; q|k|v fuse into c_attn [d, 3d]
        out[p + "attn.c_attn.weight"] = np.concatenate(
            [lw[n][i].reshape(d, d) for n in ("q", "k", "v")], axis=1)
        out[p + "attn.c_attn.bias"] = np.concatenate(
            [lw[n + "_bias"][i].reshape(d) for n in ("q", "k", "v")])
        out[p + "attn.c_proj.weight"] = lw["o"][i].reshape(d, d)
        out[p + "attn.c_proj.bias"] = lw["o_bias"][i]
        out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = lw["fc"][i], lw["fc_bias"][i]
        out[p + "mlp.c_proj.weight"] = lw["proj"][i]
        out[p + "mlp.c_proj.bias"] = lw["proj_bias"][i]
    return out


def export(ckpt: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the HF folder for checkpoint `ckpt` at `out` (atomically, via a temp sibling)."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite or choose another path")
    params = mistral_jax.load(ckpt)
    config = params.config
    weights = jax.tree.map(np.asarray, models.weights(params))
    tensors = (gpt2_tensors if isinstance(config, GPT2Config) else mistral_tensors)(config,
                                                                                   weights)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(params.dtype),
                                                                       torch.float32)
    state = {k: torch.tensor(np.ascontiguousarray(v, np.float32)).to(dtype)
             for k, v in tensors.items()}
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        hf_config = {**to_hf_dict(config), "dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if params.tokenizer is not None:
            params.tokenizer.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.to_torch", description=__doc__)
    parser.add_argument("ckpt", help="mistral_jax checkpoint directory")
    parser.add_argument("out", help="Hugging Face folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    return report(lambda: export(args.ckpt, args.out, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
