"""The tokenizer a GGUF file's metadata describes, rebuilt as ours.

`tokenizer.ggml.model` "llama" is a sentencepiece vocabulary (pieces, scores, and types numbered
as sentencepiece numbers them), rebuilt as a sentencepiece model; "gpt2" is a byte-level BPE
(vocab + merges) whose pre-tokenizer regex `tokenizer.ggml.pre` names, rebuilt as a
tokenizer.json. bos/eos/unk/pad, add_bos and the chat template come from the same metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

from convert.read.errors import ConversionError
from mistral_jax.text.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # token types


def read_tokenizer(path: Path, meta: dict) -> Tokenizer | None:
    """The tokenizer the metadata describes, as a sentencepiece model or a tokenizer.json."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or model == "none":
        return None
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConversionError(f"{path}: tokenizer.ggml.model is {model!r} but "
                              "tokenizer.ggml.tokens is missing")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    ids = {k: meta.get(f"tokenizer.ggml.{key}_token_id")
           for k, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    config = {f"{k}_token": tokens[i] for k, i in ids.items() if i is not None and i < len(tokens)}
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    if model == "llama":
        data, kind = _sentencepiece_model(path, meta, tokens, types, ids), "sentencepiece"
    elif model == "gpt2":
        data, kind = _byte_level_bpe(path, meta, tokens, types, config), "hf"
    else:
        raise ConversionError(f"{path}: tokenizer.ggml.model is {model!r}; only 'llama' "
                              "(sentencepiece) and 'gpt2' (byte-level BPE) are rebuilt")
    config_bytes = json.dumps(config, ensure_ascii=False, indent=2).encode("utf-8")
    try:
        return Tokenizer(data, kind, f"{path} (GGUF metadata)", config_bytes)
    except Exception as e:  # sentencepiece and tokenizers raise RuntimeError / bare Exception
        raise ConversionError(f"{path}: cannot rebuild the tokenizer from tokenizer.ggml.* "
                              f"({model!r}): {e}") from None


def _sentencepiece_model(path: Path, meta: dict, tokens, types, ids) -> bytes:
    """A sentencepiece BPE ModelProto holding the file's pieces, scores and piece types."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise ConversionError(f"{path}: tokenizer.ggml.tokens, scores and token_type differ in "
                              f"length ({len(tokens)}, {len(scores)}, {len(types)})")
    if list(types).count(UNKNOWN) != 1:
        raise ConversionError(f"{path}: tokenizer.ggml.token_type marks "
                              f"{list(types).count(UNKNOWN)} unknown tokens; sentencepiece needs 1")
    m = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        m.pieces.add(piece=piece, score=score, type=kind)
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    for k, i in ids.items():
        setattr(spec, f"{k}_id", -1 if i is None else i)
        if i is not None:
            setattr(spec, f"{k}_piece", tokens[i])
    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    if meta.get("tokenizer.ggml.precompiled_charsmap"):
        norm.precompiled_charsmap = bytes(meta["tokenizer.ggml.precompiled_charsmap"])
    return m.SerializeToString()


# llama.cpp's pre-tokenizer names -> the regex that splits text before BPE (None: GPT-2's own,
# which `ByteLevel(use_regex=True)` applies) and whether digits are split one by one first.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # name -> (regex, digits one by one, whole words in the vocab skip merges)
    "gpt2": (None, False, False),
    "default": (None, False, False),
    **{name: (None, True, False) for name in ("smollm", "starcoder", "refact", "codeshell",
                                              "command-r", "exaone", "minerva")},
    **{name: (_LLAMA3, False, True) for name in ("llama3", "llama-v3", "llama-bpe")},
    "tekken": (_TEKKEN, False, True),
}


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other
    68 bytes for the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _byte_level_bpe(path: Path, meta: dict, tokens, types, config: dict) -> bytes:
    """A tokenizer.json: byte-level BPE with the file's merges, pre-tokenizer and added tokens."""
    import tokenizers
    from tokenizers import decoders, pre_tokenizers, processors

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(f"{path}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer this "
                              f"converter does not know; known: {', '.join(PRE_TOKENIZERS)}")
    regex, digits, ignore_merges = PRE_TOKENIZERS[pre]
    chars = _byte_chars()
    alphabet = set(chars.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (CONTROL, USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(chars[b] for b in token.encode("utf-8"))  # stored unspelled
        vocab.setdefault(token, i)
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    if any(len(m) != 2 for m in merges):
        raise ConversionError(f"{path}: tokenizer.ggml.merges holds entries that are not two "
                              "tokens separated by a space")
    bpe = tokenizers.models.BPE(vocab, merges, ignore_merges=ignore_merges)
    tok = tokenizers.Tokenizer(bpe)
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types, strict=True) if kind == CONTROL])
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED])
    bos = [config["bos_token"]] if config["add_bos_token"] and "bos_token" in config else []
    eos = [config["eos_token"]] if config["add_eos_token"] and "eos_token" in config else []
    if bos or eos:
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]), pair=" ".join([*bos, "$A", *eos, "$B", *eos]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(bos + eos)])
    return tok.to_str().encode("utf-8")
