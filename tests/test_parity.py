"""Parity with Hugging Face transformers' torch models: logits, loss, hidden states, attentions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mistral_jax
from mistral_jax.nn.dense import MIN_QUERY_BLOCK
from mistral_jax.nn.layers import default_positions
from tests.reference import hf_model, ours, top1_agreement, torch_logits

ATOL = 1e-4


def random_ids(shape, vocab=96, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


CASES = {
    "mistral-gqa-window": ("mistral", {}),
    "mistral-mqa": ("mistral", {"num_key_value_heads": 1}),
    "mistral-mha-tied": ("mistral", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "mistral-no-window-head-dim": ("mistral", {"sliding_window": None, "head_dim": 16}),
    "llama": ("llama", {}),
    "gpt2-gelu-new": ("gpt2", {"activation_function": "gelu_new"}),
    "gpt2-gelu-untied": ("gpt2", {"activation_function": "gelu", "tie_word_embeddings": False}),
    "gpt2-gelu-fast": ("gpt2", {"activation_function": "gelu_fast", "n_inner": 48}),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return hf_model(kind, path, **overrides), ours(path)


# One batch of ids for the logits, both losses and the per-layer outputs: the programs that
# compute them from the same ids share their forward pass (XLA computes it once).
IDS = random_ids((2, 16))  # 4 windows of 4 for the windowed Mistral
LABELS = IDS.copy()
LABELS[0, :6] = -100
LABELS[1, 9:] = -100
PADDED = random_ids((3, 14), seed=1)
MASK = np.ones_like(PADDED)
MASK[0, :5] = 0  # left padding
MASK[1, :1] = 0
MASK[2, 11:] = 0  # right padding
EMBEDDED = random_ids((1, 9), seed=4)
POSITIONS = np.arange(3, 12)[None]


@pytest.fixture(scope="module")
def outputs(pair):
    """What the tests below compare with torch, all of it from ONE jitted program per model:
    the public mistral_jax.forward and mistral_jax.loss, traced together, compile once, where
    each call alone would compile its own program (a tiny model's compilation, not its
    arithmetic, is what these tests cost)."""
    _, mine = pair
    embeds = np.asarray(mine.embed[...])[EMBEDDED]

    @jax.jit
    def run(m):
        return {"logits": mistral_jax.forward(m, IDS), "loss": mistral_jax.loss(m, IDS),
                "padded": mistral_jax.forward(m, PADDED, MASK),
                "alone": mistral_jax.forward(m, PADDED[:1, 5:]),
                "labelled": mistral_jax.loss(m, IDS, labels=LABELS),
                "layers": mistral_jax.forward(m, IDS, output_hidden_states=True,
                                              output_attentions=True),
                "embedded": mistral_jax.forward(m, inputs_embeds=embeds, positions=POSITIONS)}

    return jax.tree.map(np.asarray, run(mine))


def test_logits_and_loss_equal_torch(pair, outputs):
    theirs, _ = pair
    ref = torch_logits(theirs, IDS)
    got = outputs["logits"]
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.max(np.abs(got - ref)) <= ATOL
    with torch.no_grad():
        ref_loss = theirs(torch.tensor(IDS).long(), labels=torch.tensor(IDS).long()).loss.item()
    assert abs(float(outputs["loss"]) - ref_loss) <= 1e-5


def test_left_padded_batch_equals_torch_and_unpadded(pair, outputs):
    theirs, _ = pair
    positions = np.asarray(default_positions(jnp.asarray(MASK)))
    ref = torch_logits(theirs, PADDED, MASK, positions)
    got = outputs["padded"]
    real = MASK.astype(bool)
    assert np.max(np.abs(got[real] - ref[real])) <= ATOL
    assert np.max(np.abs(got[0, 5:] - outputs["alone"][0])) <= ATOL


def test_loss_ignores_minus_100_like_torch(pair, outputs):
    theirs, _ = pair
    with torch.no_grad():
        ref = theirs(torch.tensor(IDS).long(), labels=torch.tensor(LABELS).long()).loss.item()
    assert abs(float(outputs["labelled"]) - ref) <= 1e-5


def test_hidden_states_and_attentions_equal_torch(pair, outputs):
    theirs, _ = pair
    with torch.no_grad():
        ref = theirs(torch.tensor(IDS).long(), output_hidden_states=True,
                     output_attentions=True)
    out = outputs["layers"]
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert len(out.attentions) == len(ref.attentions)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert np.max(np.abs(a - b.numpy())) <= ATOL
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        assert a.shape == tuple(b.shape)
        assert np.max(np.abs(a - b.numpy())) <= 1e-5


def test_inputs_embeds_and_explicit_positions(pair, outputs):
    theirs, mine = pair
    embeds = np.asarray(mine.embed[...])[EMBEDDED]
    with torch.no_grad():
        ref = theirs(inputs_embeds=torch.tensor(embeds),
                     position_ids=torch.tensor(POSITIONS)).logits.numpy()
    assert np.max(np.abs(outputs["embedded"] - ref)) <= ATOL


@pytest.mark.parametrize("kind,overrides", [("mistral", {}),
                                             ("llama", {"max_position_embeddings": 512}),
                                             ("gpt2", {"n_positions": 512})])
def test_long_sequences_in_causal_query_blocks_equal_torch(kind, overrides, tmp_path):
    # 300 tokens: three query blocks of 128 (the last one short), padding on both sides, and
    # (Mistral) a window of 4 inside every block
    theirs = hf_model(kind, tmp_path, **overrides)
    mine = ours(tmp_path)
    assert MIN_QUERY_BLOCK < 300 // 2
    ids = random_ids((2, 300), seed=6)
    mask = np.ones_like(ids)
    mask[0, :140] = 0  # left padding across the first block boundary
    mask[1, 290:] = 0
    positions = np.asarray(default_positions(jnp.asarray(mask)))
    ref = torch_logits(theirs, ids, mask, positions)
    # the logits and the loss traced together: one program of the model, not two
    got, loss = jax.jit(lambda m: (mistral_jax.forward(m, ids, mask),
                                   mistral_jax.loss(m, ids, mask)))(mine)
    got = np.asarray(got)
    real = mask.astype(bool)
    assert np.max(np.abs(got[real] - ref[real])) <= ATOL
    labels = np.where(real, ids, -100)
    with torch.no_grad():
        expected = theirs(torch.tensor(ids).long(), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(positions).long(),
                          labels=torch.tensor(labels).long()).loss.item()
    assert abs(float(loss) - expected) <= 1e-5


@pytest.mark.parametrize("kind", ["mistral", "gpt2"])
def test_bfloat16_top1_agrees_with_torch(kind, tmp_path):
    theirs = hf_model(kind, tmp_path)
    mine = ours(tmp_path, dtype=jnp.bfloat16)
    assert mine.embed[...].dtype == jnp.bfloat16
    ids = random_ids((8, 64), seed=5)
    ref = torch_logits(theirs, ids)
    ref_bf16 = torch_logits(theirs.to(torch.bfloat16), ids)
    got = np.asarray(mistral_jax.forward(mine, ids))
    assert top1_agreement(got, ref) >= 0.99
    assert top1_agreement(got, ref_bf16) >= 0.99


def test_convert_parity_names_the_tokens_it_measured_on(tiny_hf, tiny_ckpt, capsys):
    """convert.parity's line says what its perplexity is of: text, tokenized with the
    checkpoint's tokenizer, when there is one (in CKPT, or in the HF folder converted in
    memory); random ids, whose perplexity is high for any model, only without one."""
    from convert import parity

    capsys.readouterr()
    text = ", on 2 x 32 tokens of text (The Devil's Dictionary from its entry LAWYER on, in " \
        "train/corpus, with the checkpoint's tokenizer) [ok]\n"
    for argv in ([tiny_hf, tiny_ckpt], [tiny_hf]):
        assert parity.main([str(a) for a in argv]) == 0
        assert capsys.readouterr().out.endswith(text)
    assert parity.main(["--demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.endswith(
        ", on 2 x 32 random token ids (no tokenizer; on random ids a perplexity near the "
        "vocabulary's size, or above, is expected) [ok]") for line in lines), lines
