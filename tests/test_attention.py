"""mistral_jax/nn/attention.py: the blockwise kernel against the materialized path (outputs and
gradients, every masking case), splash in interpret mode, the dispatch, memory O(t) and work
O(t * window); then whole models against transformers' eager attention at 1024-4096 tokens:
logits and every weight's gradient, windows of 64, 500 and 4096, left padding, packed documents
against each document alone, bfloat16, and greedy generation past the window."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mistral_jax
from convert.to_torch import hf_tensors
from mistral_jax.base import trees
from mistral_jax.nn import attention as A
from mistral_jax.nn import blockwise as B
from mistral_jax.nn import dense as D
from mistral_jax.nn import layers as L
from mistral_jax.nn.masking import Masking
from tests.reference import hf_model, ours, top1_agreement, torch_logits

RNG = np.random.default_rng(0)


def qkv(b, t, n, kv, h, dtype=jnp.float32):
    return tuple(jnp.asarray(RNG.normal(size=(b, t, heads, h)), dtype)
                 for heads in (n, kv, kv))


def documents(b, t, cuts):
    seg = np.zeros((b, t), np.int32)
    for i, c in enumerate(cuts):
        seg[:, c:] = i + 1
    return jnp.asarray(seg)


KERNEL_CASES = {  # (b, t, n, kv, h, window, left padding of row 0, document cuts, blocks)
    "causal-gqa": (2, 300, 4, 2, 16, None, 0, None, (64, 32)),
    "window-not-power-of-2": (2, 300, 4, 2, 16, 50, 0, None, (64, 64)),
    "window-smaller-than-a-block": (1, 257, 4, 1, 8, 7, 0, None, (32, 32)),
    "left-padded-mqa": (2, 200, 4, 1, 16, 40, 70, None, (32, 64)),
    "packed-documents": (2, 256, 8, 2, 16, None, 0, (80, 200), (64, 64)),
    "everything": (2, 300, 4, 4, 8, 64, 5, (100, 101, 250), (64, 32)),
    "one-block": (1, 100, 4, 2, 16, None, 0, None, (256, 256)),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_blockwise_equals_the_materialized_scores_and_their_gradients(case):
    b, t, n, kv, h, window, pad, cuts, (bq, bk) = KERNEL_CASES[case]
    q, k, v = qkv(b, t, n, kv, h)
    valid = np.ones((b, t), bool)
    valid[0, :pad] = False
    masking = Masking(jnp.asarray(valid), documents(b, t, cuts) if cuts else None, window)
    # every query, padding too: one that sees no key averages all values in both
    dense = lambda q, k, v: D.attention(q, k, v, masking.dense())[0]
    flash = lambda q, k, v: B.blockwise(q, k, v, masking, (bq, bk))
    weights = jnp.asarray(RNG.normal(size=q.shape), jnp.float32)

    @jax.jit  # both paths' outputs and gradients in one program (a model runs them jitted)
    def outputs_and_grads(q, k, v):
        results = []
        for f in (dense, flash):
            out, vjp = jax.vjp(f, q, k, v)
            results.append((out, vjp(weights)))  # the gradients of sum(out * weights)
        return results

    (out_dense, grads_dense), (out_flash, grads_flash) = outputs_and_grads(q, k, v)
    np.testing.assert_allclose(out_flash, out_dense, atol=2e-6)
    for expected, got in zip(grads_dense, grads_flash, strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-6 * float(jnp.abs(expected).max()))


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32():
    q, k, v = qkv(1, 200, 4, 2, 16)
    masking = Masking(jnp.ones((1, 200), bool), None, 64)
    full, half = jax.jit(lambda q, k, v: (  # one program for both (a model runs them jitted)
        B.blockwise(q, k, v, masking, (64, 64)),
        B.blockwise(*(a.astype(jnp.bfloat16) for a in (q, k, v)), masking, (64, 64))))(q, k, v)
    assert half.dtype == jnp.bfloat16
    assert float(jnp.abs(half.astype(jnp.float32) - full).max()) < 0.05


def test_splash_in_interpret_mode_equals_blockwise():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention",
                        reason="this jax has no Pallas splash attention")
    from mistral_jax.nn.splash import splash_attention

    q, k, v = qkv(2, 200, 4, 2, 64)
    valid = np.ones((2, 200), bool)
    valid[1, :30] = False
    masking = Masking(jnp.asarray(valid), documents(2, 200, (120,)), 50)
    real = jnp.asarray(valid)[:, :, None, None]

    grad = lambda f: jax.grad(lambda q: jnp.sum(f(q) * real))  # noqa: E731

    @jax.jit  # both kernels' outputs and gradients in one program (as a model runs them)
    def outputs_and_grads(q):
        return (splash_attention(q, k, v, masking) * real,
                B.blockwise(q, k, v, masking, (64, 64)) * real,
                grad(lambda q: splash_attention(q, k, v, masking))(q),
                grad(lambda q: B.blockwise(q, k, v, masking))(q))  # the default blocks

    splash, flash, grad_splash, grad_flash = outputs_and_grads(q)
    np.testing.assert_allclose(splash, flash, atol=2e-6)
    np.testing.assert_allclose(grad_splash, grad_flash, atol=2e-6)


def test_auto_picks_the_backends_kernel_where_it_serves_the_case():
    plain = Masking(jnp.ones((1, 1024), bool), None, None)
    packed = Masking(jnp.ones((1, 1024), bool), jnp.zeros((1, 1024), jnp.int32), 4096)
    bf16 = jnp.bfloat16
    choose = A.choose
    assert choose("auto", platform="cpu", dtype=bf16, masking=plain) == "blockwise"
    # a sequence in one query block (512 on a CPU, 128 on a GPU): the materialized scores
    short = Masking(jnp.ones((1, 512), bool), None, None)
    assert choose("auto", platform="cpu", dtype=bf16, masking=short) == "xla"
    assert choose("auto", platform="cpu", dtype=bf16, masking=short, blocks=(256, 256)) == \
        "blockwise"
    assert choose("auto", platform="gpu", dtype=jnp.float32, masking=short) == "blockwise"
    assert choose("blockwise", platform="cpu", dtype=bf16, masking=short) == "blockwise"
    assert choose("auto", platform="gpu", dtype=bf16, masking=plain, left_padded=False) == \
        "cudnn"
    # cuDNN takes no packed documents, no float32, no left padding: blockwise instead
    assert choose("auto", platform="gpu", dtype=bf16, masking=packed, left_padded=False) == \
        "blockwise"
    assert choose("auto", platform="gpu", dtype=jnp.float32, masking=plain,
                  left_padded=False) == "blockwise"
    assert choose("auto", platform="gpu", dtype=bf16, masking=plain) == "blockwise"
    assert choose("auto", platform="tpu", dtype=bf16, masking=packed) == "splash"
    assert choose("auto", platform="cpu", dtype=bf16, masking=plain, weights=True) == "xla"
    assert choose("xla", platform="gpu", dtype=bf16, masking=plain) == "xla"
    with pytest.raises(A.AttentionError, match="attention='cudnn' needs an NVIDIA GPU; this "
                       "is cpu; attention='blockwise' runs everywhere"):
        choose("cudnn", platform="cpu", dtype=bf16, masking=plain)
    with pytest.raises(A.AttentionError, match="takes no packed documents"):
        choose("cudnn", platform="gpu", dtype=bf16, masking=packed, left_padded=False)
    with pytest.raises(A.AttentionError, match="needs a TPU"):
        choose("splash", platform="gpu", dtype=bf16, masking=plain)
    with pytest.raises(A.AttentionError, match="does not return the attention weights"):
        choose("blockwise", platform="cpu", dtype=bf16, masking=plain, weights=True)
    with pytest.raises(A.AttentionError, match="is not one of auto, xla, blockwise"):
        choose("flash", platform="cpu", dtype=bf16, masking=plain)


def compiled(t: int, window):
    q, k, v = qkv(1, t, 4, 2, 16)
    masking = Masking(jnp.ones((1, t), bool), None, window)
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(B.blockwise(q, k, v, masking, (256, 256))),
                         argnums=(0, 1, 2)))
    return f.lower(q, k, v).compile()


def test_memory_is_linear_in_the_sequence_and_no_t_by_t_array_exists():
    small, big = compiled(2048, None), compiled(4096, None)
    for t, c in ((2048, small), (4096, big)):
        sizes = [np.prod([int(d) for d in dims.split(",") if d])
                 for dims in re.findall(r"[fsup]\d+\[([\d,]*)\]", c.as_text())]
        assert max(sizes) < t * t / 8, max(sizes)  # the largest: a few blocks' scores
    ratio = big.memory_analysis().temp_size_in_bytes / small.memory_analysis().temp_size_in_bytes
    assert ratio < 2.2, ratio  # twice the tokens, about twice the memory (O(t^2) would be 4)


def test_a_query_block_visits_only_the_key_blocks_its_window_reaches():
    blocks = B._Blocks(t=4096, block_q=256, block_k=256, window=500)
    spans = [tuple(int(x) for x in blocks.key_range(i)) for i in range(16)]
    assert spans[0] == (0, 1) and spans[1] == (0, 2) and spans[15] == (13, 16)
    assert max(hi - lo for lo, hi in spans) == 3  # O(window / block), whatever t is
    causal = B._Blocks(t=4096, block_q=256, block_k=256, window=None)
    assert [tuple(int(x) for x in causal.key_range(i)) for i in (0, 15)] == [(0, 1), (0, 16)]


# --- whole models against transformers' eager attention --------------------------------------

LONG = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, num_hidden_layers=2,
            max_position_embeddings=8192, initializer_range=0.05)


def logits_and_grads_of_every_weight(theirs, mine, ids):
    """(transformers' logits, ours; transformers' gradients of the mean causal-LM loss, ours in
    transformers' names). Ours from one program: mistral_jax.forward and the gradient of
    mistral_jax.loss traced together (jax.grad of the jitted loss alone compiles twice)."""
    theirs.zero_grad()
    out = theirs(torch.tensor(ids).long(), labels=torch.tensor(ids).long())
    out.loss.backward()
    expected = {k: p.grad.numpy() for k, p in theirs.named_parameters()}
    loss_and_logits = lambda m: (mistral_jax.loss(m, ids), mistral_jax.forward(m, ids))  # noqa: E731
    (_, logits), g = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))(mine)
    got = hf_tensors(mine.config, jax.tree.map(np.asarray, trees.weights(g)))
    return out.logits.detach().float().numpy(), np.asarray(logits), expected, got


@pytest.mark.parametrize("t,window", [(1024, 64), (2048, 500), (4096, 4096)])
def test_long_sequences_equal_transformers_logits_and_gradients(t, window, tmp_path):
    theirs = hf_model("mistral", tmp_path, sliding_window=window, **LONG)
    mine = ours(tmp_path)
    assert mine.attention == "auto"  # blockwise on a CPU
    ids = RNG.integers(0, 96, (1, t))
    ref, logits, expected, got = logits_and_grads_of_every_weight(theirs, mine, ids)
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    assert sorted(got) == sorted(expected)
    for name, e in expected.items():
        err = np.abs(got[name] - e).max() / np.abs(e).max()
        assert err <= 1e-4, f"{name}: {err:.2e}"


def test_left_padding_at_length_equals_transformers(tmp_path):
    theirs = hf_model("mistral", tmp_path, sliding_window=500, **LONG)
    mine = ours(tmp_path)
    ids = RNG.integers(0, 96, (2, 1536))
    mask = np.ones_like(ids)
    mask[0, :300] = 0
    positions = np.asarray(L.default_positions(jnp.asarray(mask)))
    real = mask.astype(bool)
    # the logits, the loss and the first row alone traced together: one program, not three
    got, loss, alone = jax.tree.map(np.asarray, jax.jit(lambda m: (
        mistral_jax.forward(m, ids, mask), mistral_jax.loss(m, ids, mask),
        mistral_jax.forward(m, ids[:1, 300:])))(mine))
    np.testing.assert_allclose(got[real], torch_logits(theirs, ids, mask, positions)[real],
                               atol=1e-4)
    np.testing.assert_allclose(got[0, 300:], alone[0], atol=1e-4)
    # the loss counts the first real token, predicted from the last padding position, as
    # transformers' does: that position's attention (it sees no key) must be theirs too
    labels = np.where(real, ids, -100)
    with torch.no_grad():
        expected = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(positions), labels=torch.tensor(labels)).loss
    assert abs(float(loss) - expected.item()) <= 1e-5


def test_packed_documents_equal_each_document_alone(tmp_path):
    """Three documents in one row of 1200 tokens, positions restarting: each one's logits and
    loss are what transformers gives it alone."""
    theirs = hf_model("mistral", tmp_path, sliding_window=64, **LONG)
    mine = ours(tmp_path)
    lengths = (350, 500, 350)
    docs = [RNG.integers(0, 96, (1, n)) for n in lengths]
    ids = np.concatenate(docs, axis=1)
    segments = np.concatenate([np.full((1, n), i) for i, n in enumerate(lengths)], axis=1)
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    logits, _, _ = jax.jit(lambda m, i, p, s: m.run(i, None, p, segment_ids=s))(
        mine, ids, positions, segments)
    start = 0
    for doc in docs:
        n = doc.shape[1]
        np.testing.assert_allclose(np.asarray(logits)[0, start:start + n],
                                   torch_logits(theirs, doc)[0], atol=1e-4)
        start += n


def test_bfloat16_at_length_agrees_with_transformers_top1(tmp_path):
    theirs = hf_model("mistral", tmp_path, sliding_window=500, **LONG)
    mine = ours(tmp_path, dtype=jnp.bfloat16)
    ids = RNG.integers(0, 96, (1, 2048))
    ref = torch_logits(theirs, ids)
    assert top1_agreement(np.asarray(mistral_jax.forward(mine, ids)), ref) >= 0.99


def test_greedy_generation_past_the_window_equals_transformers(tmp_path):
    theirs = hf_model("mistral", tmp_path, sliding_window=64, **{**LONG, "initializer_range": 0.1})
    mine = ours(tmp_path)
    ids = RNG.integers(3, 96, (1, 700))  # eleven windows of prompt: prefilled in window chunks
    with torch.no_grad():
        expected = theirs.generate(torch.tensor(ids), attention_mask=torch.ones((1, 700)).long(),
                                   max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[:, 700:].numpy()
    np.testing.assert_array_equal(mistral_jax.generate_tokens(mine, ids, max_new_tokens=12),
                                  expected)
