"""Export a mistral_jax checkpoint to a Hugging Face folder (config.json, model.safetensors and
the tokenizer files) that transformers' `AutoModelForCausalLM.from_pretrained` loads with the
same logits; or LoRA adapters (train.finetune's OUT/adapters) to a PEFT folder that
`peft.PeftModel.from_pretrained(base, OUT)` loads onto the exported base.

    python -m convert.to_torch ckpt/ hf-out/
    python -m convert.to_torch run/adapters peft-out/
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import torch
from safetensors.torch import save_file

import mistral_jax
from convert import peft
from convert.cli import report
from mistral_jax import cli, files, lora, trees
from mistral_jax.configs import GPT2Config


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
    """Write the HF folder for checkpoint `ckpt` at `out` (whole or not at all)."""
    out = files.check_new(out, overwrite)
    params = mistral_jax.load(ckpt)
    config = params.config
    weights = jax.tree.map(np.asarray, trees.weights(params))
    tensors = (gpt2_tensors if isinstance(config, GPT2Config) else mistral_tensors)(config,
                                                                                   weights)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(params.dtype),
                                                                       torch.float32)
    state = {k: torch.tensor(np.ascontiguousarray(v, np.float32)).to(dtype)
             for k, v in tensors.items()}
    with files.atomic_directory(out, overwrite=overwrite) as tmp:
        files.write_config(tmp, config, params.tokenizer,
                           dtype=str(dtype).removeprefix("torch."))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    return out


def main(argv=None) -> int:
    p = cli.parser("python -m convert.to_torch", __doc__)
    p.add_argument("ckpt", help="mistral_jax checkpoint directory, or a LoRA adapters directory")
    p.add_argument("out", help="Hugging Face (or PEFT) folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not args.overwrite:  # before any work
        print(f"error: {args.out} already exists; pass --overwrite to replace it, or choose "
              "another OUT", file=sys.stderr)
        return 1
    write = peft.export if lora.is_adapters(args.ckpt) else export
    return report(lambda: write(args.ckpt, args.out, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
