"""`python -m convert.parity HF_FOLDER [CKPT]`: does our model give transformers' logits?

Runs the Hugging Face torch model and ours (the checkpoint CKPT, or HF_FOLDER converted in memory)
on the same random token ids, in float32, and prints the largest logit difference, the loss
difference and the top-1 agreement; exits 1 when they differ by more than `--atol`.
`--demo` does all of it on tiny random Mistral, Llama and GPT-2 models made in a temp dir.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

import mistral_jax
from convert import from_torch, hf
from mistral_jax import models

# Tiny configs for --demo and the tests: a 4-token window so 16 tokens span 4 windows.
TINY = {
    "mistral": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                    max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2),
    "llama": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                  rope_theta=500000.0, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
                 eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
CLASSES = {
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
}


def random_hf_model(kind: str, *, seed: int = 0, **overrides):
    """A tiny random transformers model (eval mode, eager attention) with non-trivial norms."""
    config_cls, model_cls = CLASSES[kind]
    config = config_cls(**{**TINY[kind], **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: make them count
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def compare(theirs, params, *, batch: int = 2, length: int = 32, seed: int = 0) -> dict:
    """Logit and loss differences between a torch model and ours on random ids."""
    length = min(length, params.config.max_position_embeddings)
    ids = np.random.default_rng(seed).integers(0, params.config.vocab_size, (batch, length))
    with torch.no_grad():
        out = theirs(torch.tensor(ids), labels=torch.tensor(ids))
    ref, ref_loss = out.logits.float().numpy(), out.loss.item()
    got = np.asarray(mistral_jax.forward(params, ids))
    return {"max_abs_logit_diff": float(np.max(np.abs(got - ref))),
            "loss_diff": abs(float(mistral_jax.loss(params, ids)) - ref_loss),
            "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}


def check(hf_folder: Path, ckpt: Path | None) -> dict:
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    if ckpt is not None:
        params = mistral_jax.load(ckpt, dtype=np.float32)
    else:
        config, weights = hf.convert(hf_folder, np.float32)
        params = models.with_weights(models.abstract(config), weights)
    return compare(theirs.eval(), params)


def demo(atol: float) -> bool:
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for kind in TINY:
            folder, ckpt = Path(tmp) / kind, Path(tmp) / f"{kind}-ckpt"
            random_hf_model(kind).save_pretrained(folder)
            from_torch.convert(folder, ckpt)
            result = check(folder, ckpt)
            ok &= report(f"{kind} (random, HF folder -> from_torch -> load)", result, atol)
    return ok


def report(name: str, r: dict, atol: float) -> bool:
    ok = r["max_abs_logit_diff"] <= atol
    print(f"{name}: max |logit diff| {r['max_abs_logit_diff']:.2e}, loss diff "
          f"{r['loss_diff']:.2e}, top-1 agreement {r['top1_agreement']:.1%} "
          f"[{'ok' if ok else 'FAIL'}]")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_folder", nargs="?", help="Hugging Face model folder")
    parser.add_argument("ckpt", nargs="?", help="our checkpoint (default: convert in memory)")
    parser.add_argument("--demo", action="store_true", help="check tiny random models")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference allowed")
    args = parser.parse_args(argv)
    if args.demo:
        return 0 if demo(args.atol) else 1
    if args.hf_folder is None:
        parser.error("give HF_FOLDER (and optionally CKPT), or --demo")
    folder = Path(args.hf_folder)
    if not hf.detect(folder):
        print(f"error: {folder} is not a Hugging Face model folder", file=sys.stderr)
        return 1
    ok = report(str(folder), check(folder, Path(args.ckpt) if args.ckpt else None), args.atol)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
