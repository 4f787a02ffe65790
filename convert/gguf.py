"""GGUF files (llama.cpp's format, `llama` / `mistral` architecture) -> our weights.

Read with the `gguf` package (llama.cpp's gguf-py, an optional extra): the metadata gives the
config and the tokenizer; tensors are memory-mapped and dequantized one at a time. What llama.cpp's
`convert_hf_to_gguf.py` does to a Llama, and what is undone here:

- Names: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
  ffn_up, ffn_down}`, `output_norm`, `output` (absent when the head is tied to the embedding).
- Shapes: GGUF lists dims fastest first (ggml's `ne`); read back in C order a Linear weight is
  [out, in], as in torch, so HF's key map applies unchanged.
- RoPE: q/k rows are permuted from HF's rotate-halves layout to interleaved pairs; permuted back.
- Tokenizer: `tokenizer.ggml.model` "llama" is a sentencepiece vocabulary (pieces, scores, types
  numbered as sentencepiece numbers them), rebuilt here as a sentencepiece model; "gpt2" is a
  byte-level BPE (vocab + merges) whose pre-tokenizer regex `tokenizer.ggml.pre` names.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np

from convert.hf import mistral_keymap
from convert.mistral_original import halves_from_interleaved
from convert.tensors import ConversionError, KeyMap, Plan, TensorSource
from mistral_jax.configs import ConfigError, MistralConfig
from mistral_jax.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "mistral")
# Tensor types dequantized here (by gguf-py); IQ*, TQ* and the rest are refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")
# GGUF tensor name -> the HF Llama name whose layout it shares (after the q/k un-permutation).
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # token types


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConversionError("reading GGUF files needs the gguf package: "
                              "pip install 'mistral_jax[gguf]'") from None
    return gguf


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF" or path.suffix == ".gguf"


def add_arguments(parser) -> None:
    parser.add_argument("--sliding-window", type=int, default=None, metavar="N",
                        help="GGUF: attend over the last N tokens only (GGUF files of Mistral-7B "
                             "do not record its 4096-token window; llama.cpp attends over all)")


class GGUFSource(TensorSource):
    """The tensors of one GGUF file, memory-mapped; `get` dequantizes one tensor to float32."""

    def __init__(self, path: Path, reader):
        super().__init__({t.name: path for t in reader.tensors})
        self.path, self.reader = path, reader
        self.tensors = {t.name: t for t in reader.tensors}

    def get(self, key: str) -> np.ndarray:
        t = self.tensors[key]
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml's ne, fastest first -> C order
        try:
            w = np.asarray(_gguf().quants.dequantize(t.data, t.tensor_type), np.float32)
        except (ValueError, NotImplementedError) as e:
            raise ConversionError(f"{self.path}: tensor {key} ({t.tensor_type.name}, shape "
                                  f"{shape}) cannot be dequantized: {e}") from None
        if np.may_share_memory(w, t.data):  # F32 comes back as a view of the memory map: copy it
            w = w.copy()
        return w.reshape(shape)

    def release(self, key: str) -> None:
        """Hand the pages of `key`'s bytes back to the kernel (read again if touched)."""
        t, mapped = self.tensors[key], getattr(self.reader.data, "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            start = t.data_offset - t.data_offset % mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, start, t.data_offset + int(t.n_bytes) - start)


def _reader_class():
    gguf = _gguf()

    class Reader(gguf.GGUFReader):
        """gguf-py's reader, which first checks that every tensor lies inside the file, so that
        a truncated file is reported by the first tensor it cuts."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            for field in fields:
                _, name, _, dims, ggml_type, offset = field.parts
                name = bytes(name).decode("utf-8", "replace")
                try:
                    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type[0])]
                except (ValueError, KeyError):
                    raise ValueError(f"tensor {name} has unknown ggml type "
                                     f"{ggml_type[0]}") from None
                end = start_offs + int(offset[0]) + int(np.prod(dims)) * size // block
                if end > len(self.data):
                    raise ValueError(f"tensor {name} ends at byte {end}, past the end of the file "
                                     f"({len(self.data)} bytes): the file is truncated")
            super()._build_tensors(start_offs, fields)

    return Reader


def read(path: Path):
    """gguf-py's reader over `path` (memory-mapped) and its metadata as plain Python values."""
    try:
        reader = _reader_class()(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
        reader.fields.clear()  # a numpy view per token and merge: let them go
    except ConversionError:
        raise
    except Exception as e:  # gguf-py raises ValueError, IndexError, numpy errors alike
        raise ConversionError(f"{path}: cannot read it as GGUF ({path.stat().st_size} bytes; "
                              f"truncated or corrupt?): {e}") from None
    return reader, meta


def read_config(path: Path, meta: dict, tensors: dict, *,
                sliding_window: int | None = None) -> MistralConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{path}: general.architecture is {arch!r}; only "
                              f"{' and '.join(map(repr, ARCHITECTURES))} convert to mistral_jax")

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # some files give per-layer values; we need them all equal
            if len(set(value)) != 1:
                raise ConversionError(f"{path}: {arch}.{key} differs between layers ({value}); "
                                      "mistral_jax needs one value for every layer")
            value = value[0]
        return value

    def need(key: str):
        if get(key) is None:
            raise ConversionError(f"{path}: metadata key {arch}.{key} is missing")
        return get(key)

    def refuse(key: str, what: str):
        raise ConversionError(f"{path}: {arch}.{key} = {get(key)!r}: {what}, which mistral_jax "
                              "does not implement")

    if get("expert_count", 0):
        refuse("expert_count", "a mixture of experts")
    if get("rope.scaling.type", "none") not in ("none", "linear"):  # linear by 1.0 is none
        refuse("rope.scaling.type", "RoPE scaling")
    if get("rope.scaling.factor", 1.0) != 1.0:
        refuse("rope.scaling.factor", f"RoPE scaling ({get('rope.scaling.type')})")
    if "rope_freqs.weight" in tensors:
        raise ConversionError(f"{path}: tensor rope_freqs.weight scales RoPE frequencies "
                              "(Llama 3.1 style), which mistral_jax does not implement")
    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
        refuse("attention.value_length", f"values of another size than keys ({head_dim})")
    if get("rope.dimension_count", head_dim) != head_dim:
        refuse("rope.dimension_count", f"RoPE on part of each head (of {head_dim})")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else get("vocab_size")
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])  # ne = [hidden, vocab]
    if vocab is None:
        raise ConversionError(f"{path}: no tokenizer.ggml.tokens, {arch}.vocab_size nor "
                              "token_embd.weight to give the vocabulary size")
    if sliding_window is None and arch == "mistral":  # llama.cpp's llama attends over all
        sliding_window = get("attention.sliding_window")
    special = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    try:
        return MistralConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=need("feed_forward_length"),
            num_hidden_layers=need("block_count"), num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
            max_position_embeddings=need("context_length"),
            rms_norm_eps=need("attention.layer_norm_rms_epsilon"),
            rope_theta=get("rope.freq_base", 10000.0),  # llama.cpp's default when absent
            sliding_window=sliding_window, tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=special["bos"], eos_token_id=special["eos"],
            pad_token_id=special["padding"])
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None


def keymap(c: MistralConfig) -> KeyMap:
    by_hf = mistral_keymap(c)
    out = {k: by_hf[hf_name] for k, hf_name in HF_NAMES.items()}
    for key, heads in (("blk.{i}.attn_q.weight", c.num_attention_heads),
                       ("blk.{i}.attn_k.weight", c.num_key_value_heads)):
        name, to_ours = out[key]
        out[key] = (name, lambda w, f=to_ours, n=heads: f(halves_from_interleaved(w, n)))
    return out


def plan(path: Path, *, sliding_window: int | None = None) -> Plan:
    reader, meta = read(path)
    tensors = {t.name: t for t in reader.tensors}
    config = read_config(path, meta, tensors, sliding_window=sliding_window)
    unsupported = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
                   if t.tensor_type.name not in SUPPORTED_TYPES]
    if unsupported:
        raise ConversionError(f"{path}: {len(unsupported)} tensor(s) in a type this converter "
                              f"does not dequantize: {', '.join(unsupported[:8])}"
                              f"{' ...' if len(unsupported) > 8 else ''}; supported: "
                              f"{', '.join(SUPPORTED_TYPES)}")
    notes = []
    types = sorted({t.tensor_type.name for t in reader.tensors} - {"F32"})
    if types:
        notes.append(f"{path.name}: {'/'.join(types)} tensors dequantized (stored as float32 "
                     "unless --dtype says otherwise)")
    name = str(meta.get("general.name", ""))
    if config.sliding_window is None and "mistral" in name.lower():
        notes.append(f"{path.name} ({name}) records no sliding window: converted with full "
                     "attention, as llama.cpp runs it (--sliding-window 4096 for Mistral-7B's)")
    return Plan(config, GGUFSource(path, reader), keymap(config), (),
                read_tokenizer(path, meta), notes, origin=str(path))


# --- the tokenizer -----------------------------------------------------------------------------


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
