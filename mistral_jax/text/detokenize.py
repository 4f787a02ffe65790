"""Incremental detokenization: turn a stream of token ids into text pieces as they arrive.

Decoding token by token and concatenating is wrong in two ways: a character may span several
tokens (sentencepiece byte-fallback pieces like `<0xE2><0x82><0xAC>` for "€", or GPT-2 byte-level
BPE tokens that split a UTF-8 sequence), and a decoder treats the start of its input specially
(sentencepiece and Metaspace drop the leading "▁" space of the first piece). So we decode a short
window, `context` (tokens already emitted) + `pending` (tokens not yet fully emitted), and emit what
decode(context + pending) has beyond decode(context). Text ending in U+FFFD may be an incomplete
character, so that tail is held back until a later token completes it (or `flush`). Once nothing is
held back, `pending` becomes the next `context`: it starts at a character boundary and decodes to
non-empty text (else the context grows, so it is the whole history or non-empty), so start-of-text
rules only touch the context. Hugging Face's ByteFallback decoder turns a whole run of `<0x..>`
pieces into U+FFFDs if any byte is invalid, so there we wait for the run to end. Skipped special
tokens are dropped on arrival, as decode() drops them. Each push decodes a few tokens (more only
while a character or byte run stays incomplete), however long the stream.
Invariant: "".join(push(t) for t in ids) + flush() == tokenizer.decode(ids, skip_special_tokens)."""

from __future__ import annotations

import os
import re

from mistral_jax.text.tokenizer import Tokenizer

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class StreamDecoder:
    """`push(token_id)` returns the text that is now final (maybe ""); `flush()` the rest, after
    which the decoder starts a fresh stream."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._info: dict[int, tuple[bool, bool]] = {}  # id -> (skipped special, hf byte piece)
        self._reset()

    def _reset(self) -> None:
        self._context: list[int] = []  # emitted tokens kept for the decoder's left context
        self._pending: list[int] = []  # tokens whose text is not (all) out yet
        self._before = ""  # decode(context)
        self._sent = 0  # characters of decode(context + pending)[len(before):] already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        i = int(token_id)
        if i not in self._info:  # special: decodes to nothing, yet to something when kept
            kept = self.tokenizer.decode([i], skip_special_tokens=False)
            byte = BYTE_PIECE.fullmatch(self.tokenizer.id_to_piece(i) or "")
            self._info[i] = (self.skip_special_tokens and self._decode([i]) == "" != kept,
                             self.tokenizer.kind == "hf" and byte is not None)
        skipped, hf_byte = self._info[i]
        if not skipped:
            self._pending.append(i)
        return "" if skipped or hf_byte else self._emit(final=False)

    def flush(self) -> str:
        out = self._emit(final=True)
        self._reset()
        return out

    def _emit(self, final: bool) -> str:
        text = self._decode(self._context + self._pending)
        # Always `before` itself for the decoders above; should another decoder revise the context's
        # text, the stream is off but goes on.
        new = text[len(os.path.commonprefix([self._before, text])):]
        ready = new if final else new.rstrip("\ufffd")
        out, self._sent = ready[self._sent:], max(self._sent, len(ready))
        if ready == new and not final:  # nothing held back: pending starts the next context
            alone = self._decode(self._pending)
            if alone:
                self._context, self._before = self._pending, alone
            else:
                self._context, self._before = self._context + self._pending, text
            self._pending, self._sent = [], 0
        return out


CONTEXT = 4  # prompt tokens decoded before the new ones, so the first keeps its leading space


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the first of the `stops` strings in it (all of it when none is)."""
    ends = [text.index(s) for s in stops if s in text]
    return text[: min(ends)] if ends else text


class CompletionText:
    """A completion's text as its tokens arrive, as it reads after the prompt (the prompt's last
    CONTEXT tokens prime the decoder) and cut before the first `stops` string: `push(token)`
    gives the text now final, holding back a tail that could still become a stop string;
    `stopped` once one appeared (push then gives nothing more); `flush()` gives the rest.
    Used by `generate(..., stream=True)` and by the server, for every request."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stops: list[str] = ()):
        self.decoder, self.stops = StreamDecoder(tokenizer), list(stops)
        for token in prompt[-CONTEXT:]:  # context only: its text is not sent
            self.decoder.push(token)
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        self.text += self.decoder.push(token)
        return self._emit(self.hold)

    def flush(self) -> str:
        self.text += self.decoder.flush()
        return self._emit(0)

    def _emit(self, hold: int) -> str:
        if self.stopped:
            return ""
        end = len(cut_at_stop(self.text, self.stops))
        self.stopped = end < len(self.text)
        if not self.stopped:
            end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent: end], end
        return out
