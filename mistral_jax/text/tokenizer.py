"""One small tokenizer interface over a sentencepiece `tokenizer.model` or a Hugging Face
`tokenizer.json` (plus an optional HF `tokenizer_config.json` for special tokens and the chat
template). Uses only the `sentencepiece` and `tokenizers` packages: no torch, no transformers."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm
import tokenizers

SP_FILE, HF_FILE, CONFIG_FILE = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the chat template here
# Fallback special-token names for a tokenizer.json without a tokenizer_config.json.
_HF_DEFAULTS = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
}


def _token_content(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string, a {"content": ...} dict or null."""
    return value.get("content") if isinstance(value, dict) else value


def _read_config(config: str | Path | bytes | None) -> bytes | None:
    """tokenizer_config.json bytes (given as a path or as bytes), checked to be a JSON object."""
    data = config if isinstance(config, bytes | None) else Path(config).read_bytes()
    try:
        why = "" if isinstance(json.loads(data or b"{}"), dict) else "not a JSON object"
    except ValueError as e:
        why = str(e)
    if why:
        name = CONFIG_FILE if isinstance(config, bytes) else config
        raise ValueError(f"{name}: expected a JSON tokenizer_config.json ({why})")
    return data


class Tokenizer:
    """Encode/decode with a sentencepiece model ("sentencepiece") or a tokenizer.json ("hf")."""

    def __init__(self, data: bytes, kind: Literal["sentencepiece", "hf"], name: str,
                 config_bytes: bytes | None = None) -> None:
        self.kind, self._data, self._config_bytes = kind, data, config_bytes
        config: dict[str, Any] = json.loads(config_bytes) if config_bytes else {}
        self.chat_template: str | None = config.get("chat_template")
        if kind == "sentencepiece":
            self._sp = spm.SentencePieceProcessor(model_proto=data)
            self.vocab_size: int = self._sp.vocab_size()
            ids = {k: getattr(self._sp, f"{k}_id")() for k in ("bos", "eos", "pad", "unk")}
            self._add_bos = bool(config.get("add_bos_token", True))
            self._add_eos = bool(config.get("add_eos_token", False))
        else:
            self._hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            ids = {k: next((i for n in names if (i := self.piece_to_id(n)) is not None), None)
                   for k, names in _HF_DEFAULTS.items()}
        for k in ("bos", "eos", "pad", "unk"):
            if f"{k}_token" in config:  # the config wins, including an explicit null
                token = _token_content(config[f"{k}_token"])
                ids[k] = None if token is None else self.piece_to_id(token)
        ok = {k: v for k, v in ids.items() if v is not None and v >= 0}  # sentencepiece: -1 = none
        self.bos_id: int | None = ok.get("bos")
        self.eos_id: int | None = ok.get("eos")
        self.pad_id: int | None = ok.get("pad")
        self.unk_id: int | None = ok.get("unk")
        self._file = SP_FILE if kind == "sentencepiece" else HF_FILE
        self.name = name

    @classmethod
    def from_file(cls, path: str | Path, *,
                  config: str | Path | bytes | None = None) -> Tokenizer:
        """Load a sentencepiece `.model` or a Hugging Face `tokenizer.json` (by content), with an
        optional tokenizer_config.json (its path, or its bytes)."""
        path = Path(path)
        data = path.read_bytes()
        config_bytes = _read_config(config)
        try:
            is_json = isinstance(json.loads(data), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            is_json = False
        expected = "a sentencepiece model or a Hugging Face tokenizer.json"
        if is_json:
            try:
                return cls(data, "hf", str(path), config_bytes)
            except Exception as e:  # tokenizers raises a bare Exception on a bad tokenizer.json
                why = (str(e).splitlines() or [type(e).__name__])[0]
                raise ValueError(f"{path}: expected {expected}, got other JSON ({why})") from None
        try:
            tok = cls(data, "sentencepiece", str(path), config_bytes)
        except RuntimeError:  # sentencepiece could not parse the ModelProto
            tok = None
        if tok is None or tok.vocab_size == 0:
            raise ValueError(f"{path}: expected {expected}")
        return tok

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """tokenizer.model (preferred) or tokenizer.json in `path`, plus tokenizer_config.json and
        chat_template.jinja (which wins over the config's chat_template, as in transformers)."""
        path = Path(path)
        config: Path | bytes | None = path / CONFIG_FILE if (path / CONFIG_FILE).is_file() else None
        if (path / TEMPLATE_FILE).is_file():
            merged = json.loads(_read_config(config) or b"{}")
            merged["chat_template"] = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
            config = json.dumps(merged, ensure_ascii=False, indent=2).encode("utf-8")
        for name in (SP_FILE, HF_FILE):
            if (path / name).is_file():
                return cls.from_file(path / name, config=config)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls.from_bpe_files(path / "vocab.json", path / "merges.txt", config=config)
        return None

    @classmethod
    def from_bpe_files(cls, vocab: str | Path, merges: str | Path, *,
                       config: str | Path | bytes | None = None) -> Tokenizer:
        """GPT-2's byte-level BPE from `vocab.json` + `merges.txt`, as GPT-2 and Megatron ship it;
        built the way transformers' GPT2TokenizerFast builds it, and saved as a tokenizer.json."""
        try:
            bpe = tokenizers.models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:  # tokenizers raises a bare Exception on unreadable files
            raise ValueError(f"{vocab} + {merges}: not a GPT-2 vocab/merges pair ({e})") from None
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
        if tok.token_to_id("<|endoftext|>") is not None:
            tok.add_special_tokens(["<|endoftext|>"])
        return cls(tok.to_str().encode("utf-8"), "hf", str(vocab), _read_config(config))

    def encode(self, text: str, *, add_bos: bool | None = None,
               parse_special: bool = False) -> list[int]:
        """Token ids. `add_bos=None`: the tokenizer's own convention; True/False forces BOS.
        `parse_special`: see `encode_text` (a tokenizer.json always parses its added tokens)."""
        if self.kind == "sentencepiece":
            ids = self.encode_text(text, parse_special=parse_special)
            bos = self._add_bos if add_bos is None else add_bos
            eos = [self.eos_id] if self._add_eos and self.eos_id is not None else []
            return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + eos
        ids = self._hf.encode(text, add_special_tokens=True).ids
        if add_bos is None or self.bos_id is None:
            return ids
        plain = self._hf.encode(text, add_special_tokens=False).ids
        if ids[:1] == [self.bos_id] and ids.count(self.bos_id) > plain.count(self.bos_id):
            ids = ids[1:]  # drop the BOS the post-processor added; keep one written in `text`
        return [self.bos_id] + ids if add_bos and ids[:1] != [self.bos_id] else ids

    def encode_text(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Ids of `text` alone: no BOS/EOS added (transformers' `add_special_tokens=False`).

        parse_special=True maps each special token written in `text` (sentencepiece: the control
        pieces such as <s> and </s>, <unk>, and the config's bos/eos/unk/pad tokens) to its id and
        encodes the text between them as separate pieces, each with sentencepiece's usual "▁"
        prefix, as transformers' converted tokenizer.model does (its "legacy" behaviour; with
        `"legacy": false` in tokenizer_config.json transformers adds no "▁" after a special
        token). A tokenizer.json always splits on its added tokens, as `tokenizers` does."""
        if self.kind == "hf":
            return self._hf.encode(text, add_special_tokens=False).ids
        if not parse_special:
            return list(self._sp.encode(text))
        pattern, ids = self._special_pieces
        out: list[int] = []
        for i, part in enumerate(pattern.split(text)):  # odd parts are the special tokens
            out += [ids[part]] if i % 2 else self._sp.encode(part) if part else []
        return out

    def encode_offsets(self, text: str, *, parse_special: bool = False,
                       ) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode_text`'s ids and each token's [start, end) character span in `text`.

        A tokenizer.json gives the spans itself. Sentencepiece gives each piece's byte span in
        the text it was given (its `proto` output), mapped here to characters; the leading byte
        pieces of a character it spells byte by byte come with empty spans, and take the span of
        the piece that ends the character, so every token has the text it stands for."""
        if self.kind == "hf":
            encoding = self._hf.encode(text, add_special_tokens=False)
            return encoding.ids, [tuple(o) for o in encoding.offsets]
        parts = (self._special_pieces[0].split(text) if parse_special else [text])
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        at = 0  # the character where the part starts
        for i, part in enumerate(parts):  # odd parts are special tokens
            if i % 2:
                ids.append(self._special_pieces[1][part])
                spans.append((at, at + len(part)))
            elif part:
                ids_, spans_ = self._sp_offsets(part)
                ids += ids_
                spans += [(at + a, at + b) for a, b in spans_]
            at += len(part)
        return ids, spans

    def _sp_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        pieces = self._sp.encode(text, return_type="proto").pieces
        char_at = [0] * (len(text.encode("utf-8")) + 1)  # byte offset -> character offset
        byte = 0
        for c, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            char_at[byte:byte + n] = [c] * n
            byte += n
        char_at[byte] = len(text)
        spans = [(char_at[p.begin], char_at[p.end]) for p in pieces]
        for k in range(len(spans) - 2, -1, -1):  # byte pieces: the span of the one after
            if spans[k][0] == spans[k][1] and spans[k + 1][0] == spans[k][0]:
                spans[k] = spans[k + 1]
        return [p.id for p in pieces], spans

    @functools.cached_property
    def _special_pieces(self) -> tuple[re.Pattern[str], dict[str, int]]:
        """A regex splitting on the sentencepiece special pieces (longest first), and their ids."""
        sp = self._sp
        special = [i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
        special += [i for i in (self.bos_id, self.eos_id, self.unk_id, self.pad_id)
                    if i is not None]
        ids = {sp.id_to_piece(i): i for i in special}
        alternatives = "|".join(re.escape(p) for p in sorted(ids, key=len, reverse=True))
        return re.compile(f"({alternatives})"), ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for vocab size {self.vocab_size}")
        if self.kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        special = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in special])
        out, run = [], []  # sentencepiece drops control pieces, so spell them out ourselves
        for i in ids + [-1]:
            if i in special or i == -1:
                out += [self._sp.decode(run)] + ([self.id_to_piece(i)] if i != -1 else [])
                run = []
            else:
                run.append(i)
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i) if self.kind == "sentencepiece" else self._hf.id_to_token(i)

    def piece_to_id(self, piece: str) -> int | None:
        if self.kind == "hf":
            return self._hf.token_to_id(piece)
        i = self._sp.piece_to_id(piece)  # unknown pieces map to unk: check the round trip
        return i if 0 <= i < self.vocab_size and self._sp.id_to_piece(i) == piece else None

    def files(self) -> list[str]:
        return [self._file] + ([CONFIG_FILE] if self._config_bytes is not None else [])

    def save(self, path: str | Path) -> list[Path]:
        """Write the original tokenizer file bytes (and tokenizer_config.json) into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / self._file).write_bytes(self._data)
        if self._config_bytes is not None:
            (path / CONFIG_FILE).write_bytes(self._config_bytes)
        return [path / f for f in self.files()]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and (self.kind, self._data, self._config_bytes) == (
            other.kind, other._data, other._config_bytes)

    def __hash__(self) -> int:  # models carry their tokenizer as static pytree data: jit hashes it
        return hash((self.kind, self._data, self._config_bytes))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, source={self.name!r})"
