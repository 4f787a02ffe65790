"""Tokenized documents -> rows of `seq_len` tokens.

Isolated documents (the default) are packed best-fit decreasing: each row holds whole documents,
placed longest first, each in the row with the least room that still fits it, and a new row only
when none does (MaxText's packing change AI-Hypercomputer/maxtext#2884 reports up to 27% less
padding). A document longer than a row is first cut into pieces of at most
`seq_len`, a conversation at the start of a user turn where one falls inside the row; each piece
is then a document of its own. On the default run's data at 256 tokens a row (bench/packing.py):
424 rows where 423 is the least possible, 0.38% padding (first fit 1.77%, next fit 20.45%), and
no document cut but the 103 longer than a row.

Without isolation a row is one stream of text, so the documents are concatenated and cut into
rows, as every run did before: only the last row is padded (0.14% on the default data), but 359
of its 938 documents run from one row into the next.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import heapq
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mistral_jax.nn.layers import IGNORE_INDEX


class Tokens(NamedTuple):
    """One tokenized document."""

    ids: np.ndarray  # [n] int32
    counted: np.ndarray  # [n] bool: the tokens the loss predicts
    turns: tuple[int, ...] = ()  # where a user turn starts: the places to cut it, if it must be


@dataclass(frozen=True)
class Rows:
    """Packed rows, each [n_rows, seq_len]: the model's inputs and labels."""

    ids: np.ndarray
    labels: np.ndarray  # IGNORE_INDEX where the token is not predicted
    positions: np.ndarray
    segments: np.ndarray  # a document's (or piece's) index; -1 on padding
    cut: tuple[int, ...] = ()  # the documents that did not fit one row whole

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.ids.tobytes() + self.labels.tobytes()).hexdigest()[:16]

    @property
    def padding_share(self) -> float:
        return float((self.segments < 0).mean()) if self.segments.size else 0.0

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {"ids": self.ids[index], "labels": self.labels[index],
                "positions": self.positions[index], "segments": self.segments[index]}


def pack(docs: list[Tokens], seq_len: int, *, pad_id: int,
         isolate_documents: bool = True) -> Rows:
    """Rows of `seq_len` tokens: best-fit decreasing when documents are isolated (each starts
    afresh: positions from 0, its first token not predicted from the row before it), else one
    stream cut into rows."""
    docs = [Tokens(*d) for d in docs]
    if not isolate_documents:
        return _stream(docs, seq_len, pad_id)
    pieces = [(d, a, b) for d, doc in enumerate(docs) for a, b in cut_points(doc, seq_len)]
    bins = best_fit_decreasing([b - a for _, a, b in pieces], seq_len)
    ids = np.full((len(bins), seq_len), pad_id, np.int32)
    counted = np.zeros(ids.shape, bool)
    segments = np.full(ids.shape, -1, np.int32)
    for row, members in enumerate(bins):
        col = 0
        for p in members:
            d, a, b = pieces[p]
            ids[row, col:col + b - a] = docs[d].ids[a:b]
            counted[row, col:col + b - a] = docs[d].counted[a:b]
            segments[row, col:col + b - a] = p
            col += b - a
    labels = np.where(counted, ids, IGNORE_INDEX).astype(np.int32)
    starts = np.ones_like(segments, bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    labels[:, 1:][starts[:, 1:]] = IGNORE_INDEX  # not predicted from another document
    cut = tuple(sorted({d for d, a, _ in pieces if a > 0}))
    return Rows(ids, labels, _positions_within_segments(starts), segments, cut)


def cut_points(doc: Tokens, seq_len: int) -> list[tuple[int, int]]:
    """[start, end) pieces of at most `seq_len` tokens covering `doc`: each piece as long as it
    can be while ending where a user turn starts, or exactly `seq_len` when no turn starts
    inside it (a single turn longer than a row)."""
    n, turns = len(doc.ids), sorted(doc.turns)
    out, start = [], 0
    while n - start > seq_len:
        k = bisect.bisect_right(turns, start + seq_len) - 1
        end = turns[k] if k >= 0 and turns[k] > start else start + seq_len
        out.append((start, end))
        start = end
    return out + [(start, n)]


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices. Items go longest first (ties: lower index first), each into the bin
    with the least room left that holds it (ties: the bin opened first), else into a new bin.
    Bins come in the order they were opened, their items in index order."""
    if any(not 0 < n <= capacity for n in lengths):
        raise ValueError(f"items must be 1..{capacity} long")
    bins: list[list[int]] = []
    rooms: list[int] = []  # the room values some bin has, ascending
    bins_with: dict[int, list[int]] = {}  # room -> heap of the bins with that much room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(rooms, lengths[i])
        if k == len(rooms):
            b, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[k]
            b = heapq.heappop(bins_with[room])
            if not bins_with[room]:
                del bins_with[room], rooms[k]
        bins[b].append(i)
        left = room - lengths[i]
        if left:
            if left not in bins_with:
                bins_with[left] = []
                bisect.insort(rooms, left)
            heapq.heappush(bins_with[left], b)
    return [sorted(b) for b in bins]


def _stream(docs: list[Tokens], seq_len: int, pad_id: int) -> Rows:
    """Concatenate the documents and cut rows of `seq_len`; the last row is padded."""
    ids = np.concatenate([d.ids for d in docs])
    counted = np.concatenate([d.counted for d in docs])
    segments = np.concatenate([np.full(len(d.ids), i, np.int32) for i, d in enumerate(docs)])
    n_rows = math.ceil(len(ids) / seq_len)
    pad = n_rows * seq_len - len(ids)
    ids = np.concatenate([ids, np.full(pad, pad_id, np.int32)]).reshape(n_rows, seq_len)
    counted = np.concatenate([counted, np.zeros(pad, bool)]).reshape(n_rows, seq_len)
    segments = np.concatenate([segments, np.full(pad, -1, np.int32)]).reshape(n_rows, seq_len)
    labels = np.where(counted, ids, IGNORE_INDEX).astype(np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy()
    crossing = (segments[:-1, -1] == segments[1:, 0]) & (segments[1:, 0] >= 0)
    cut = tuple(sorted(set(segments[1:, 0][crossing].tolist())))
    return Rows(ids, labels, positions, segments, cut)


def _positions_within_segments(starts: np.ndarray) -> np.ndarray:
    """Each token's distance from the start of its segment in the row."""
    index = np.broadcast_to(np.arange(starts.shape[1]), starts.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return (index - last_start).astype(np.int32)


def describe(rows: Rows, documents: int, what: str) -> str:
    """"WHAT: N documents, M tokens, R rows of S tokens" (for messages)."""
    tokens = int((rows.segments >= 0).sum())
    return (f"{what}: {documents:,} document{'s' * (documents != 1)}, {tokens:,} tokens, "
            f"{len(rows):,} row{'s' * (len(rows) != 1)} of {rows.ids.shape[1]} tokens")
