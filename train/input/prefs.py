"""Preference data: JSONL lines {"prompt", "chosen", "rejected"} -> the token ids of the prompt
and of each response -> pairs of rows (chosen, rejected) -> seeded, resumable batches of pairs.

A line takes one of two forms:
- strings: the prompt is tokenized as train.finetune tokenizes a {"prompt", "completion"} line's
  prompt (with the tokenizer's BOS when it adds one), each response as its completion followed
  by EOS; the response and its EOS are counted.
- chat: "prompt" a list of {"role", "content"} messages, "chosen" and "rejected" each an
  assistant message (or a list holding one). The checkpoint's chat template renders the prompt
  with the generation prompt, and the prompt followed by each response without; a response's
  tokens are what follows the longest prefix the renderings share (as TRL's DPOTrainer splits
  them): the assistant turn as the template writes it, its end-of-turn token included.

A pair longer than --seq-len loses the start of its prompt first (the end, next to the
responses, is kept), then the ends of its responses; one warning counts them. A row holds one
sequence, right-padded to the longest in the file (at most --seq-len): chosen and rejected are
two rows of the same pair, [pairs, 2, seq] in every array.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.nn.layers import IGNORE_INDEX
from mistral_jax.parallel.sharding import BATCH, split_over
from mistral_jax.text.chat_template import encode_chat
from train.input import data as D
from train.input.data import DataError

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Pair:
    """Token ids of a prompt and of its two responses (each counted in full)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


def read_pairs(path: str | Path, tokenizer) -> list[Pair]:
    """The pairs of a .jsonl file, tokenized; a bad line is a DataError naming FILE:LINE."""
    path = Path(path)
    raw = D.read_text(path)
    if tokenizer is None:
        raise DataError("the checkpoint has no tokenizer, so text cannot be tokenized; add one "
                        "to the checkpoint directory (tokenizer.model or tokenizer.json)")
    return [_pair(line, f"{path}:{number}", tokenizer)
            for number, line in enumerate(raw.splitlines(), 1) if line.strip()]


def _pair(line: str, where: str, tokenizer) -> Pair:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with \"prompt\", \"chosen\" and "
                        f"\"rejected\", got {type(row).__name__}")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise DataError(f"{where}: a preference line needs \"prompt\", \"chosen\" and "
                        f"\"rejected\"; missing {', '.join(map(json.dumps, missing))}")
    if isinstance(row["prompt"], str):
        pair = _text_pair(row, where, tokenizer)
    elif isinstance(row["prompt"], list):
        pair = _chat_pair(row, where, tokenizer)
    else:
        raise DataError(f"{where}: \"prompt\" must be a string or a list of messages, got "
                        f"{type(row['prompt']).__name__}")
    if pair.chosen == pair.rejected:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" are the same response; a pair "
                        "needs two different ones")
    return pair


def _text_pair(row: dict, where: str, tokenizer) -> Pair:
    for field in ("chosen", "rejected"):
        if not isinstance(row[field], str):
            raise DataError(f"{where}: \"{field}\" must be a string, as \"prompt\" is (or make "
                            "\"prompt\" a list of messages and each response an assistant "
                            "message)")
    responses = []
    for field in ("chosen", "rejected"):
        tokens = D.tokenize([D.Document(row[field], prompt=row["prompt"])], tokenizer)[0]
        ids, counted = tokens.ids, tokens.counted
        start = len(ids) - int(counted.sum())
        responses.append(tuple(ids[start:].tolist()))
    return Pair(tuple(ids[:start].tolist()), *responses)


def _chat_pair(row: dict, where: str, tokenizer) -> Pair:
    prompt = row["prompt"]
    for i, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: prompt[{i}] must be a message {{\"role\", \"content\"}} "
                            "with string values")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: prompt[{i}] has the unknown role {m['role']!r}; roles "
                            f"are {', '.join(ROLES)}")
    responses = [_assistant(row[field], field, where) for field in ("chosen", "rejected")]
    try:
        head = encode_chat(tokenizer, prompt, add_generation_prompt=True)
        full = [encode_chat(tokenizer, prompt + [r], add_generation_prompt=False)
                for r in responses]
    except ValueError as e:
        raise DataError(f"{where}: the chat template cannot render this conversation: "
                        f"{e}") from None
    start = min(_common_prefix(head, f) for f in full)
    pair = Pair(tuple(head[:start]), *(tuple(f[start:]) for f in full))
    if not pair.chosen or not pair.rejected:
        raise DataError(f"{where}: the chat template renders no tokens for a response")
    return pair


def _assistant(value, field: str, where: str) -> dict:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not (isinstance(value, dict) and value.get("role") == "assistant"
            and isinstance(value.get("content"), str)):
        raise DataError(f"{where}: with a list of messages as \"prompt\", \"{field}\" must be "
                        "one assistant message {\"role\": \"assistant\", \"content\": \"...\"} "
                        "(or a list holding one)")
    return value


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def fit(pair: Pair, seq_len: int) -> Pair:
    """The pair within `seq_len` tokens a row: the prompt cut from the left (keeping at least
    one token when it has any, so the first response token is predicted), then the responses
    at their end."""
    longest = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest <= seq_len:
        return pair
    keep = min(len(pair.prompt), max(seq_len - longest, min(len(pair.prompt), 1)))
    room = seq_len - keep
    return Pair(pair.prompt[len(pair.prompt) - keep:], pair.chosen[:room], pair.rejected[:room])


@dataclass(frozen=True)
class PairRows:
    """Pairs as rows, each array [pairs, 2 (chosen, rejected), seq] but `reference` [pairs, 2]:
    the reference's log-probability of each response (zeros until computed)."""

    ids: np.ndarray
    labels: np.ndarray  # IGNORE_INDEX where the token is not counted
    positions: np.ndarray
    segments: np.ndarray  # 0 on a token, -1 on padding (for the FLOPs count)
    reference: np.ndarray

    ARRAYS = ("ids", "labels", "positions", "segments", "reference")

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.ids.tobytes() + self.labels.tobytes()).hexdigest()[:16]

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {name: getattr(self, name)[index] for name in self.ARRAYS}

    def with_reference(self, reference: np.ndarray) -> PairRows:
        return replace(self, reference=np.asarray(reference, np.float32).reshape(len(self), 2))

    def tokens(self, index: np.ndarray) -> int:
        return int((self.segments[index] >= 0).sum())


def rows(pairs: list[Pair], seq_len: int, *, pad_id: int) -> tuple[PairRows, int]:
    """(the pairs as rows no longer than `seq_len`, how many pairs had to be cut)."""
    fitted = [fit(p, seq_len) for p in pairs]
    cut = sum(f != p for f, p in zip(fitted, pairs, strict=True))
    width = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in fitted)
    shape = (len(fitted), 2, width)
    ids = np.full(shape, pad_id, np.int32)
    labels = np.full(shape, IGNORE_INDEX, np.int32)
    segments = np.full(shape, -1, np.int32)
    for i, p in enumerate(fitted):
        for j, response in enumerate((p.chosen, p.rejected)):
            n, m = len(p.prompt), len(response)
            ids[i, j, :n + m] = p.prompt + response
            labels[i, j, n:n + m] = response
            segments[i, j, :n + m] = 0
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), shape).copy()
    return PairRows(ids, labels, positions, segments, np.zeros(shape[:2], np.float32)), cut


class PairBatches(D.Batches):
    """`D.Batches` over pairs: `batch_size` pairs a step ([grad_accum, micro, 2, seq] each),
    shuffled afresh each epoch from `seed`; `position` is all a checkpoint needs."""

    def __init__(self, rows: PairRows, *, batch_size: int, grad_accum: int, seed: int, mesh,
                 shuffle: bool = True, position: int = 0):
        super().__init__(rows, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                         mesh=mesh, shuffle=shuffle, position=position)
        self.mesh = mesh

    def __next__(self) -> dict[str, jax.Array]:
        batch = place(self.rows, self.row_indices(self.position), self.mesh)
        self.position += self.batch_size
        return batch


def place(rows: PairRows, index: np.ndarray, mesh) -> dict[str, jax.Array]:
    """The pairs `index` [k, b] as global arrays [k, b, ...] split over the mesh's data axis on
    b, each process building only the slices its devices hold."""
    cache: dict = {}

    def field(name):
        tail = getattr(rows, name).shape[1:]
        shape = (*index.shape, *tail)
        sharding = NamedSharding(mesh, P(None, split_over(mesh, BATCH), *(None,) * len(tail)))

        def local(slices):
            key = (slices[0].indices(shape[0]), slices[1].indices(shape[1]))
            if key not in cache:
                cache[key] = rows.take(index[slices[0], slices[1]])
            return cache[key][name]
        return jax.make_array_from_callback(shape, sharding, local)

    return {name: field(name) for name in PairRows.ARRAYS}


def _filled(rows: PairRows) -> PairRows:
    """`rows` and one more pair, at index len(rows), with nothing counted: the filling."""
    empty = lambda a, fill: np.concatenate([a, np.full((1, *a.shape[1:]), fill, a.dtype)])
    return PairRows(empty(rows.ids, 0), empty(rows.labels, IGNORE_INDEX),
                    empty(rows.positions, 0), empty(rows.segments, -1), empty(rows.reference, 0))


def eval_batch(rows: PairRows, *, batch_size: int, max_batches: int, mesh):
    """The first `max_batches` * `batch_size` pairs, in order, as [batches, batch_size, ...];
    missing pairs are filling with nothing counted."""
    n = min(len(rows), max_batches * batch_size)
    k = -(-n // batch_size)
    index = np.arange(k * batch_size)
    return place(_filled(rows), np.where(index < n, index, len(rows)).reshape(k, batch_size),
                 mesh)


def in_order(rows: PairRows, *, batch_size: int, grad_accum: int, mesh):
    """Every pair, in order, in batches [grad_accum, batch_size / grad_accum, ...] (the last
    one filled up with pairs that count nothing)."""
    filled = _filled(rows)
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, start + batch_size)
        yield place(filled, np.where(index < len(rows), index, len(rows)).reshape(
            grad_accum, -1), mesh)
