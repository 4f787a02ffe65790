"""Training data: text / JSONL files -> tokenized documents (each ending in EOS, or in its chat
template's end of turn) -> rows of `seq_len` tokens (packing.py) -> seeded, resumable batches
placed with their `data`-axis sharding.

A plain text file is one document. A JSONL file holds one object per line with `text`; or with
`prompt` and `completion` (the loss then counts the completion and its EOS only); or with
`messages`, a conversation rendered with the checkpoint's chat template (chat.py: by default the
loss counts the assistant's turns only). `loss_on="all"` counts every token of every document.

Packing is global and deterministic (the same rows in the same order whatever the number of
processes); each process then builds only the rows its own devices hold
(`jax.make_array_from_callback`), so a multi-host run splits the batches, not the data order.
With `isolate_documents` (the default), a token attends only within its document (segment ids),
positions restart at each document, and the first token of a document is not predicted from the
last; without, a row is one stream of text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.nn.layers import IGNORE_INDEX
from mistral_jax.parallel.sharding import BATCH, axis_size, split_over
from train.input import chat
from train.input.packing import Rows, Tokens, describe, pack

__all__ = ["Rows", "Tokens", "describe", "pack"]  # packing's, here for the callers of data


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class Document:
    text: str = ""  # the whole document when `prompt` and `messages` are None
    prompt: str | None = None  # with a prompt, `text` is the completion
    messages: tuple[dict[str, str], ...] | None = None  # a conversation
    where: str = field(default="", compare=False)  # FILE:LINE, for errors


def read_text(path: Path) -> str:
    """A data file's text; a missing, non-UTF-8 or empty file is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    return raw


def read_documents(path: str | Path) -> list[Document]:
    """The documents of a .txt / .jsonl file (by suffix; .json lines too)."""
    path = Path(path)
    raw = read_text(path)
    if path.suffix not in (".jsonl", ".json"):
        return [Document(raw)]
    docs = []
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            docs.append(_jsonl_document(line, f"{path}:{number}"))
    return docs


def _jsonl_document(line: str, where: str) -> Document:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with \"text\", \"prompt\" and "
                        f"\"completion\", or \"messages\", got {type(row).__name__}")
    if "text" in row and isinstance(row["text"], str):
        return Document(row["text"], where=where)
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return Document(row["completion"], prompt=row["prompt"], where=where)
    if "messages" in row:
        try:
            return Document(messages=chat.check_messages(row["messages"]), where=where)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    raise DataError(f"{where}: expected a string field \"text\", string fields \"prompt\" and "
                    f"\"completion\", or a list \"messages\"; found fields {sorted(row)}")


def tokenize(docs: list[Document], tokenizer, *, loss_on: str = "assistant") -> list[Tokens]:
    """Tokens per document: the tokenizer's ids then EOS (a conversation: its template's text);
    `counted` marks the tokens the loss predicts: all of them under `loss_on="all"`, else a
    completion and its EOS, or the assistant's turns (chat.py)."""
    if tokenizer is None:
        raise DataError("the checkpoint has no tokenizer, so text cannot be tokenized; add one "
                        "to the checkpoint directory (tokenizer.model or tokenizer.json)")
    if tokenizer.eos_id is None:
        raise DataError(f"the tokenizer {tokenizer.name} has no EOS token to separate documents")
    if loss_on not in chat.LOSS_ON:
        raise DataError(f"loss_on must be one of {', '.join(chat.LOSS_ON)}, got {loss_on!r}")
    out = []
    for doc in docs:
        if doc.messages is not None:
            try:
                out.append(chat.encode(tokenizer, doc.messages, loss_on=loss_on))
            except ValueError as e:
                raise DataError(f"{doc.where or 'a conversation'}: {e}") from None
            continue
        if doc.prompt is None:
            ids = tokenizer.encode(doc.text) + [tokenizer.eos_id]
            counted = [True] * len(ids)
        else:
            prompt = tokenizer.encode(doc.prompt)
            completion = tokenizer.encode_text(doc.text) + [tokenizer.eos_id]
            ids = prompt + completion
            counted = [loss_on == "all"] * len(prompt) + [True] * len(completion)
        out.append(Tokens(np.asarray(ids, np.int32), np.asarray(counted, bool)))
    return out


def summary(rows: Rows, docs: list[Document], what: str, *,
            isolate_documents: bool = True) -> list[str]:
    """What start-up says about packed data: a line of counts and the padding share, and a
    warning when conversations were cut to fit the rows."""
    seq_len = rows.ids.shape[1]
    cut = "" if not rows.cut else (f", {len(rows.cut):,} longer than a row cut into pieces"
                                   if isolate_documents else
                                   f", {len(rows.cut):,} running on into the next row")
    lines = [f"note: {describe(rows, len(docs), what)}, {rows.padding_share:.1%} padding{cut}"]
    chats = sum(docs[d].messages is not None for d in rows.cut)
    if chats and isolate_documents:
        lines.append(f"warning: {what}: {chats:,} of "
                     f"{sum(d.messages is not None for d in docs):,} conversations are longer "
                     f"than --seq-len {seq_len} and were cut into pieces, at the start of a user "
                     "turn where one fits (a piece does not see the turns before it)")
    return lines


def check_batch(batch_size: int, grad_accum: int, mesh) -> None:
    """Raise unless a micro-batch splits evenly over the mesh's data x fsdp devices."""
    if batch_size % grad_accum:
        raise DataError(f"--batch-size {batch_size} is not a multiple of --grad-accum "
                        f"{grad_accum}")
    micro, ways = batch_size // grad_accum, axis_size(mesh, BATCH)
    if micro % ways:
        raise DataError(f"a micro-batch of {micro} rows (--batch-size / --grad-accum) does "
                        f"not split over the mesh's {ways} data-parallel replicas (D x F)")


class Batches:
    """Batches of `batch_size` rows ([grad_accum, batch_size / grad_accum, seq_len] each), rows
    shuffled afresh each epoch from `seed`. `position` (rows handed out so far) is all a
    checkpoint needs to continue the same sequence."""

    def __init__(self, rows: Rows, *, batch_size: int, grad_accum: int, seed: int,
                 mesh, shuffle: bool = True, position: int = 0):
        check_batch(batch_size, grad_accum, mesh)
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.seed, self.shuffle, self.position = seed, shuffle, position
        self.sharding = NamedSharding(mesh, P(None, split_over(mesh, BATCH), None))
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.rows)
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)
                            if self.shuffle else np.arange(n)}
        return self._orders[epoch]

    def row_indices(self, start: int) -> np.ndarray:
        """[grad_accum, micro] indices into the rows of the batch starting at `start`."""
        n = len(self.rows)
        flat = [self.order(p // n)[p % n] for p in range(start, start + self.batch_size)]
        return np.asarray(flat).reshape(self.grad_accum, -1)

    def __next__(self) -> dict[str, jax.Array]:
        batch = place(self.rows, self.row_indices(self.position), self.sharding)
        self.position += self.batch_size
        return batch

    def __iter__(self):
        return self


def place(rows: Rows, index: np.ndarray, sharding: NamedSharding) -> dict[str, jax.Array]:
    """The batch of rows `index` [k, b] as global arrays [k, b, seq], each process building
    only the slices its devices hold."""
    shape = (*index.shape, rows.ids.shape[1])
    cache: dict = {}

    def field(name):
        def local(slices):
            key = (slices[0].indices(shape[0]), slices[1].indices(shape[1]))
            if key not in cache:
                cache[key] = rows.take(index[slices[0], slices[1]])
            return cache[key][name]
        return jax.make_array_from_callback(shape, sharding, local)

    return {name: field(name) for name in ("ids", "labels", "positions", "segments")}


def eval_batch(rows: Rows, *, batch_size: int, max_batches: int, mesh) -> dict[str, jax.Array]:
    """The first `max_batches` * `batch_size` rows, in order, as [micro-batches, batch_size,
    seq]; missing rows are padding (nothing counted)."""
    n = min(len(rows), max_batches * batch_size)
    k = math.ceil(n / batch_size)
    index = np.arange(k * batch_size)
    index = np.where(index < n, index, -1)
    padded = Rows(*(np.concatenate([a, fill]) for a, fill in (
        (rows.ids, np.zeros((1, rows.ids.shape[1]), np.int32)),
        (rows.labels, np.full((1, rows.ids.shape[1]), IGNORE_INDEX, np.int32)),
        (rows.positions, np.zeros((1, rows.ids.shape[1]), np.int32)),
        (rows.segments, np.full((1, rows.ids.shape[1]), -1, np.int32)))))
    return place(padded, index.reshape(k, batch_size),
                 NamedSharding(mesh, P(None, split_over(mesh, BATCH), None)))
