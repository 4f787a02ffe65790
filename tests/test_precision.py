"""Reduced precision on the real SmolLM2-135M-Instruct (its Q4_1 GGUF, whose embedding is Q8_0)
against transformers' float32 load of the same file: perplexity of a held-out paragraph fed
through the decode step (KV cache included), and bfloat16's greedy choices against float32's.
The checkpoints are written by the command line, once a run (conftest's smollm2)."""

import numpy as np

import mistral_jax
from bench import accuracy
from mistral_jax.base import trees
from mistral_jax.quant import int8 as quant


def test_int8_checkpoint_keeps_q8_0_blocks_and_is_small(smollm2):
    import gguf

    model = mistral_jax.load(smollm2["int8"])
    w = quant.stored(trees.flatten(trees.weights(model)))
    assert w["layers.q"].dtype == np.int8 and w["layers.q_scale"].shape == (30, 1, 9, 64)
    # token_embd is Q8_0: its int8 values and block scales come through as they are
    assert w["embed_scale"].shape == (49152, 576 // 32)
    token_embd = next(t for t in gguf.GGUFReader(smollm2["gguf"]).tensors
                      if t.name == "token_embd.weight")
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize(np.asarray(w["embed"]), np.asarray(w["embed_scale"]), 0, 1,
                                    "nk")),
        gguf.quants.dequantize(token_embd.data, token_embd.tensor_type).reshape(49152, 576))
    int8_bytes = sum(f.stat().st_size for f in smollm2["int8"].rglob("*") if f.is_file())
    float32_bytes = 4 * sum(x.size for x in w.values() if x.dtype == np.int8) + sum(
        x.nbytes for x in w.values() if x.dtype != np.int8)
    print(f"int8 checkpoint {int8_bytes / 1e6:.0f} MB, float32 weights "
          f"{float32_bytes / 1e6:.0f} MB")
    assert int8_bytes <= 0.30 * float32_bytes


def test_perplexity_and_greedy_choices_against_transformers(smollm2):
    ids = np.array([mistral_jax.load(smollm2["float32"]).tokenizer.encode(accuracy.PARAGRAPH)],
                   np.int32)
    ref = accuracy.reference(smollm2, ids)
    ref_ppl = accuracy.perplexity(ref, ids)
    limits = {"bfloat16": 0.01, "int8": 0.015, "int8+kv8": 0.02}  # (float32: bench/accuracy)
    models = {v: accuracy.load(smollm2, v) for v in ("float32", *limits)}
    assert quant.kernel_ok(models["int8"]) == mistral_jax.kernels.available()
    for variant, limit in limits.items():
        logits = accuracy.decode_logits(models[variant], ids)
        off = accuracy.perplexity(logits, ids) / ref_ppl - 1
        top1 = (logits.argmax(-1) == ref.argmax(-1)).mean()
        print(f"{variant}: perplexity {off:+.2%} off transformers' {ref_ppl:.2f}, top-1 {top1:.1%}")
        assert abs(off) <= limit and top1 >= 0.9
    runs = accuracy.greedy_runs(models["float32"])
    same = (accuracy.greedy_choices(models["bfloat16"], runs)
            == accuracy.greedy_choices(models["float32"], runs, forward=True)).mean()
    print(f"bfloat16 picks float32's greedy token at {same:.1%} of 8 x 64 positions")
    assert same >= 0.95
