"""Padding and cut documents of each way to pack the default run's training data (the shipped
corpus, its own BPE) into rows: `python bench/packing.py [--seq-len 256 512 ...]`.

- stream: concatenate and cut (train.finetune --no-isolate-documents, and every run before
  best-fit packing): only the last row is padded, but a document that runs into the next row
  is cut there, its second part not seeing its first;
- next fit, first fit: whole documents in reading order, into the open row (next fit) or the
  first row with room (first fit);
- best fit decreasing: what isolated runs pack (train/input/packing.py).

A document longer than a row is cut into row-long pieces for all but the stream; those cuts
cannot be avoided. "Tokens cut off" counts the tokens in a row after the one their document
starts in: they do not see their document's beginning. Seconds: one pass, nothing timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.input import data as D  # noqa: E402
from train.input import default  # noqa: E402
from train.input.packing import cut_points  # noqa: E402


def rows_in_order(lengths: list[int], seq_len: int, first: bool) -> int:
    rooms: list[int] = []
    for n in lengths:
        fits = [i for i, room in enumerate(rooms if first else rooms[-1:]) if room >= n]
        if fits:
            rooms[fits[0] if first else -1] -= n
        else:
            rooms.append(seq_len - n)
    return len(rooms)


def cut_off(rows: D.Rows) -> int:
    """Tokens of the stream in a later row than their document's first token."""
    segments = rows.segments.ravel()
    row = np.arange(len(segments)) // rows.ids.shape[1]
    real = segments >= 0
    first = np.full(segments.max() + 1, -1)
    first[segments[real][::-1]] = row[real][::-1]  # the last write per segment is its first
    return int((row[real] != first[segments[real]]).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[256, 512, 1024])
    args = p.parse_args()
    docs = D.tokenize(default.documents()[0], default.tokenizer())
    tokens = sum(len(d.ids) for d in docs)
    print(f"{len(docs)} documents, {tokens:,} tokens (the default run's training data)\n")
    print("| seq | packing | rows | padding | documents cut | tokens cut off |")
    print("|---|---|---|---|---|---|")
    for seq_len in args.seq_len:
        stream = D.pack(docs, seq_len, pad_id=0, isolate_documents=False)
        best = D.pack(docs, seq_len, pad_id=0)
        pieces = [b - a for d in docs for a, b in cut_points(d, seq_len)]
        longer = f"{sum(len(d.ids) > seq_len for d in docs)} (longer than a row)"
        lost = f"{sum(max(len(d.ids) - seq_len, 0) for d in docs) / tokens:.1%}"
        share = lambda rows: f"{1 - tokens / (rows * seq_len):.2%}"  # noqa: B023
        print(f"| {seq_len} | stream | {len(stream)} | {share(len(stream))} | "
              f"{len(stream.cut)} | {cut_off(stream) / tokens:.1%} |")
        for name, first in (("next fit", False), ("first fit", True)):
            n = rows_in_order(pieces, seq_len, first)
            print(f"| {seq_len} | {name} | {n} | {share(n)} | {longer} | {lost} |")
        print(f"| {seq_len} | best fit decreasing | {len(best)} | {share(len(best))} | "
              f"{longer} | {lost} |")
        assert len(best.cut) == sum(len(d.ids) > seq_len for d in docs)


if __name__ == "__main__":
    main()
