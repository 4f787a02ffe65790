"""Export a mistral_jax checkpoint to a Hugging Face folder (config.json, model.safetensors and
the tokenizer files) that transformers' `AutoModelForCausalLM.from_pretrained` loads with the
same logits; or LoRA adapters (train.finetune's OUT/adapters) to a PEFT folder that
`peft.PeftModel.from_pretrained(base, OUT)` loads onto the exported base.

    python -m convert.to_torch ckpt/ hf-out/
    python -m convert.to_torch run/adapters peft-out/ --base-model hf-out/
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import torch
from safetensors.torch import save_file

import mistral_jax
from convert.cli import report
from convert.formats import hf, peft
from convert.mapping.keymaps import torch_tensors
from mistral_jax import cli
from mistral_jax.base import trees
from mistral_jax.io import files, lora
from mistral_jax.quant import int8 as quant


def hf_tensors(config, weights: dict) -> dict[str, np.ndarray]:
    """transformers' state dict ({HF key: array}) for our nested dict of numpy weights: the
    import's key map (convert/formats/hf.py) walked back."""
    return torch_tensors(hf.keymap(config), config, weights)


def export(ckpt: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the HF folder for checkpoint `ckpt` at `out` (whole or not at all)."""
    out = files.check_new(out, overwrite)
    model = mistral_jax.load(ckpt)
    if quant.is_quantized(model):  # transformers takes float weights: int8 x scale, in float32
        print(f"note: {ckpt} holds int8 weights; exported dequantized, as float32",
              file=sys.stderr)
        model = quant.dequantized(model)
    config = model.config
    weights = jax.tree.map(np.asarray, trees.weights(model))
    tensors = hf_tensors(config, weights)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(model.dtype),
                                                                       torch.float32)
    state = {k: torch.tensor(np.ascontiguousarray(v, np.float32)).to(dtype)
             for k, v in tensors.items()}
    with files.atomic_directory(out, overwrite=overwrite) as tmp:
        files.write_config(tmp, config, model.tokenizer,
                           dtype=str(dtype).removeprefix("torch."))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        files.as_new_file(tmp / "model.safetensors")  # safetensors writes it 0600
    return out


def main(argv=None) -> int:
    p = cli.parser("python -m convert.to_torch", __doc__)
    p.add_argument("ckpt", help="mistral_jax checkpoint directory, or a LoRA adapters directory")
    p.add_argument("out", help="Hugging Face (or PEFT) folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--base-model", metavar="NAME_OR_PATH", help="with an adapters directory: "
                   "the Hugging Face model the PEFT folder names as its base "
                   "(base_model_name_or_path), a Hub id or a folder, such as the base "
                   "checkpoint's own export (default: none named, and a note says so)")
    return cli.entry(p, _run, argv)


def _run(args) -> int:
    if lora.is_adapters(args.ckpt):
        return report(lambda: peft.export(args.ckpt, args.out, overwrite=args.overwrite,
                                          base_model=args.base_model))
    if args.base_model is not None:
        raise ValueError(f"--base-model goes with an adapters directory, and {args.ckpt} is "
                         "not one (a checkpoint's export is itself the base)")
    return report(lambda: export(args.ckpt, args.out, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
