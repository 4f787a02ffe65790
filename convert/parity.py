"""Does our model give transformers' logits? Runs the Hugging Face torch model in HF_FOLDER and
ours (the checkpoint CKPT, or HF_FOLDER converted in memory) on the same tokens, in float32, and
prints how far apart they are: the largest logit difference, against the largest logit, the
top-1 agreement and the two perplexities. The tokens are a passage of The Devil's Dictionary
(train/corpus) tokenized with the checkpoint's tokenizer, so the perplexity is a model's on
text; without a tokenizer, random token ids, on which every model's perplexity is high (about
the vocabulary's size, or more).

The verdict scales with the model: float32 rounding over many layers grows with the logits, so
the largest difference may be --atol plus --rtol times the largest logit; the top-1 agreement
must reach --min-top1 and the perplexities must agree to 0.1%. A wrong conversion (a transposed
or permuted weight) misses all three by orders of magnitude. Exit code 0 when it passes, 1 when
it does not.

    python -m convert.parity path/to/hf-folder ckpt/
    python -m convert.parity --demo          # tiny random Mistral, Llama and GPT-2 models
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

import mistral_jax
from convert import from_torch
from convert.formats import hf
from mistral_jax.base import trees
from mistral_jax.cli import HelpFormatter, entry
from mistral_jax.model import registry as models
from mistral_jax.model.apply import check_ids, on_mesh
from mistral_jax.parallel.sharding import mesh_of
from mistral_jax.text.tokenizer import Tokenizer

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


def tokens(model, tokenizer, *, batch: int = 2, length: int = 32,
           seed: int = 0) -> tuple[np.ndarray, str]:
    """[batch, length] ids to compare on, and what they are: the dictionary from its entry
    PASSAGE on, tokenized with `tokenizer`, cut into rows; random ids without a tokenizer."""
    length = min(length, model.config.max_position_embeddings)
    if tokenizer is not None:
        ids = np.asarray(tokenizer.encode_text(passage()), np.int64)[:batch * length]
        if len(ids) == batch * length and ids.max() < model.config.vocab_size:
            return ids.reshape(batch, length), (
                f"{batch} x {length} tokens of text (The Devil's Dictionary from its entry "
                f"{PASSAGE} on, in train/corpus, with the checkpoint's tokenizer)")
    why = "no tokenizer" if tokenizer is None else "the tokenizer's ids do not fit the model"
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, length))
    return ids, (f"{batch} x {length} random token ids ({why}; on random ids a perplexity "
                 "near the vocabulary's size, or above, is expected)")


PASSAGE = "LAWYER"  # the dictionary entry the text compared on starts at


def passage(entries: int = 20) -> str:
    """`entries` entries of the dictionary from PASSAGE on: plain prose, hundreds of tokens."""
    from train.input import default

    found = default.entries(default.CORPUS.read_text(encoding="utf-8"))
    first = next(i for i, e in enumerate(found) if e.startswith(PASSAGE + ","))
    return "\n\n".join(found[first:first + entries])


@jax.jit
def _logits_and_loss(model, ids):
    """mistral_jax.forward and .loss traced together: one compilation of the model, not two."""
    return mistral_jax.forward(model, ids), mistral_jax.loss(model, ids)


def compare(theirs, model, ids: np.ndarray) -> dict:
    """How far our logits and loss are from a torch model's on the token ids `ids`."""
    with torch.no_grad():
        out = theirs(torch.tensor(ids), labels=torch.tensor(ids))
    ref, ref_loss = out.logits.float().numpy(), out.loss.item()
    # under the weights' mesh, as forward and loss enter it themselves when called eagerly
    # (inside jit they cannot read it from tracers)
    with on_mesh(mesh_of(model)):
        got, loss = _logits_and_loss(model, check_ids(ids, model.config.vocab_size))
    got, loss = np.asarray(got), float(loss)
    return {"max_abs_logit_diff": float(np.max(np.abs(got - ref))),
            "max_abs_logit": float(np.max(np.abs(ref))),
            "loss_diff": abs(loss - ref_loss),
            "perplexity": math.exp(min(loss, 80.0)), "their_perplexity": math.exp(
                min(ref_loss, 80.0)),
            "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4  # tiny models: their logits are near 1
    rtol: float = 1e-5  # of the largest logit: SmolLM2-135M (logits to ~33) differs by ~1e-4
    min_top1: float = 0.99
    perplexity_rtol: float = 1e-3

    def verdict(self, r: dict) -> dict[str, bool]:
        allowed = self.atol + self.rtol * r["max_abs_logit"]
        ppl = abs(r["perplexity"] - r["their_perplexity"]) / r["their_perplexity"]
        return {"logits": r["max_abs_logit_diff"] <= allowed,
                "top1": r["top1_agreement"] >= self.min_top1,
                "perplexity": ppl <= self.perplexity_rtol}


def check(hf_folder: Path, ckpt: Path | None) -> dict:
    """`compare`'s figures, and under "tokens" what they were measured on."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    if ckpt is not None:
        model = mistral_jax.load(ckpt, dtype=np.float32)
        tokenizer = model.tokenizer
    else:
        config, weights = hf.convert(hf_folder, np.float32)
        model = trees.with_weights(models.abstract(config), weights)
        tokenizer = Tokenizer.from_dir(hf_folder)
    ids, what = tokens(model, tokenizer)
    return {**compare(theirs.eval(), model, ids), "tokens": what}


def demo(tolerance: Tolerance) -> bool:
    transformers.utils.logging.disable_progress_bar()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for kind in TINY:
            folder, ckpt = Path(tmp) / kind, Path(tmp) / f"{kind}-ckpt"
            random_hf_model(kind).save_pretrained(folder)
            from_torch.convert(folder, ckpt)
            result = check(folder, ckpt)
            ok &= report(f"{kind} (random, HF folder -> from_torch -> load)", result, tolerance)
    return ok


def report(name: str, r: dict, tolerance: Tolerance) -> bool:
    verdict = tolerance.verdict(r)
    allowed = tolerance.atol + tolerance.rtol * r["max_abs_logit"]
    missed = [k for k, v in verdict.items() if not v]
    print(f"{name}: max |logit diff| {r['max_abs_logit_diff']:.2e} (allowed {allowed:.1e} for "
          f"logits up to {r['max_abs_logit']:.1f}), top-1 agreement {r['top1_agreement']:.1%}, "
          f"perplexity {r['perplexity']:.6g} vs transformers' {r['their_perplexity']:.6g}, "
          f"on {r['tokens']} " + (f"[FAIL: {', '.join(missed)}]" if missed else "[ok]"))
    return not missed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.parity", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("hf_folder", nargs="?", help="Hugging Face model folder")
    parser.add_argument("ckpt", nargs="?", help="our checkpoint (default: convert in memory)")
    parser.add_argument("--demo", action="store_true", help="check tiny random models")
    parser.add_argument("--atol", type=float, default=Tolerance.atol,
                        help="logit difference allowed at any scale")
    parser.add_argument("--rtol", type=float, default=Tolerance.rtol,
                        help="and per unit of the largest logit")
    parser.add_argument("--min-top1", type=float, default=Tolerance.min_top1,
                        help="least share of positions where both pick the same next token")

    def run(args) -> int:
        tolerance = Tolerance(args.atol, args.rtol, args.min_top1)
        if args.demo:
            return 0 if demo(tolerance) else 1
        if args.hf_folder is None:
            parser.error("give HF_FOLDER (and optionally CKPT), or --demo")
        folder = Path(args.hf_folder)
        if not hf.detect(folder):
            raise ValueError(f"{folder} is not a Hugging Face model folder")
        result = check(folder, Path(args.ckpt) if args.ckpt else None)
        return 0 if report(str(folder), result, tolerance) else 1

    return entry(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
