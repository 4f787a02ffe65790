"""Continuous batching (Orca, Yu et al. 2022; vLLM's scheduler): a fixed number of slots share
one KV cache, and requests come and go between decode steps.

A background thread loops: admit waiting requests into free slots; run prefill chunks of
prompts, one chunk per prompt and up to PREFILL_TURN chunks' tokens a turn (each stepped as a
batch of one in its slot's cache row, where it lies), so running requests keep decoding while a
long prompt goes in and a burst of prompts gets its first tokens together; then one decode step
over the live slots only (slots 0 .. w - 1, each at its own sequence index: `slots.decode`),
padded to the next of a few compiled widths (1, 2, 4, ... max_batch): a step costs the work of
its live rows, not of every slot. Each step is dispatched before the previous one's tokens
are read (a row's next inputs do not depend on its token), so that the host's work per token
overlaps the device's. A finished or cancelled request frees its slot at once.
Sampling options and seeds are arrays over the rows, so the decode step compiles once per
width and prefill once per chunk width (`warm_up` does both ahead).

A prompt's first chunk holds the remainder, left-padded (`first_width`). In a window's rolling
buffer the chunks start at multiples of the chunk (which divides the window), so no chunk wraps
around it, as in `generation` (`inference.chunks` holds the rules both follow); otherwise the
prompt starts at index 0, and a step reads only the cache's blocks that hold something
(`cache.blocks_in_use`; a freed slot is marked empty). A padding row's write in a decode step
(a slot not decoding) lands at its next sequence index, marked empty (-1); a slot still being
prefilled has that index rewritten by its next chunk before any query can see it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import threading
import time
from dataclasses import dataclass

import jax
import numpy as np

from mistral_jax.inference.chunks import MAX_CHUNK, bucket, window_chunk
from mistral_jax.inference.kv_cache import beside, new_cache
from mistral_jax.inference.sampling import RowSampling, Sampling
from mistral_jax.model.apply import check_ids, check_positions, on_mesh
from mistral_jax.parallel import sharding
from mistral_jax.serving import slots
from mistral_jax.serving.request import Event, Request
from mistral_jax.serving.slots import Slots, decode_widths

__all__ = ["Engine", "Event", "QueueFull", "Request"]

DEFAULT_MAX_LEN = 4096  # the cache's sequence length when the model allows more
PREFILL_TURN = 4  # prefill chunks (of different prompts) between two decode steps, at most


class QueueFull(RuntimeError):
    """`max_queue` requests are already waiting for a slot (a server answers 429)."""


@dataclass
class Chunk:
    start: int  # sequence index of its first entry
    ids: np.ndarray  # [1, c]
    valid: np.ndarray  # [1, c]
    positions: np.ndarray  # [1, c]


def first_width(first: int, chunk: int) -> int:
    """The width a first chunk of `first` tokens is padded to (one compilation each): a power of
    two up to 64, then a multiple of 64, at most `chunk`. (Prefill is bound by arithmetic: a
    136-token prompt costs 192 tokens' work, not a power of two's 256.)"""
    return min(chunk, bucket(first) if first <= 64 else -(-first // 64) * 64)


def prompt_chunks(prompt: list[int], chunk: int, rolling: bool) -> list[Chunk]:
    """The prompt's prefill chunks: the first holds the remainder (left-padded: `first_width`),
    the rest are whole. In a rolling buffer each starts at a multiple of `chunk` but the first,
    which ends at one (so none wraps); otherwise the first starts at 0, so a step reads no
    more of the cache than the sequences hold."""
    n = len(prompt)
    first = n - chunk * ((n - 1) // chunk)  # tokens in the first chunk: 1 .. chunk
    width = first_width(first, chunk)
    pad = width - first
    ids = np.array([[0] * pad + list(prompt)], np.int32)
    valid = np.array([[0] * pad + [1] * n], np.int32)
    positions = np.array([[0] * pad + list(range(n))], np.int32)
    cuts = [0, *range(width, pad + n, chunk)]
    offset = chunk - width if rolling else 0
    return [Chunk(offset + a, ids[:, a:b], valid[:, a:b], positions[:, a:b])
            for a, b in zip(cuts, [*cuts[1:], pad + n], strict=True)]


@dataclass
class Slot:
    request: Request
    chunks: list[Chunk]  # prefill chunks still to run; none: decoding
    index: int  # sequence index of the next write (the next chunk's start, or the next token's)
    position: int  # position (RoPE / learned) of the next token
    admitted: int  # the order slots were taken in: prompts are prefilled first come, first served
    steps: int = 0  # decode steps dispatched for it (its tokens read so far may be one fewer)

    @property
    def stepping(self) -> bool:
        """Prefilled, and a token to go that no dispatched step computes yet."""
        return not self.chunks and not self.request.done and self.steps < self.request.max_tokens


class Engine:
    """`Engine(model).submit(prompt_ids, max_tokens=...)` -> a `Request` to iterate. Use as a
    context manager, or `start()` and `stop()` (which cancels what still runs).

    The cache holds `max_batch` sequences of `max_len` tokens (prompt and completion; default:
    the model's max_position_embeddings, at most DEFAULT_MAX_LEN) or, with a sliding window, the
    window's rolling buffer; `max_queue` requests may wait for a slot (then `QueueFull`);
    prompts are prefilled `prefill_chunk` tokens at a time (default: MAX_CHUNK, made to divide
    the window)."""

    def __init__(self, model, *, max_batch: int = 8, max_len: int | None = None,
                 max_queue: int = 64, prefill_chunk: int | None = None):
        config = model.config
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        if max_len is None:
            max_len = min(config.max_position_embeddings, DEFAULT_MAX_LEN)
        prefill_chunk = MAX_CHUNK if prefill_chunk is None else prefill_chunk
        for name, value in [("max_batch", max_batch), ("max_len", max_len),
                            ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)]:
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        check_positions(config, max_len, f"max_len={max_len}")
        self.max_len = max_len
        self.chunk = window_chunk(config, min(prefill_chunk, bucket(max_len)))
        self.eos = -1 if config.eos_token_id is None else config.eos_token_id
        vocab = config.vocab_size
        self.mesh = sharding.mesh_of(model)  # read once: it walks every weight
        with on_mesh(self.mesh):  # a prompt's padding takes up to `chunk` - 1 indices more
            cache = new_cache(model, max_batch, self.max_len + self.chunk, self.mesh)
        self.rolling = cache.slots < self.max_len + self.chunk  # a window's rolling buffer
        self._state = Slots(cache, *beside((np.zeros((max_batch, vocab), np.float32),
                                            np.zeros((max_batch, vocab), bool)), cache))
        self.decode_widths = decode_widths(max_batch)
        self._slots: list[Slot | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._device = threading.Lock()  # held by whoever steps the state (the thread, warm_up)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._admitted = 0
        # the last decode step dispatched, its tokens not read yet: ([(row, slot)], tokens,
        # logprobs). The next step is dispatched before they are read (see `_decode`).
        self._pending: tuple[list[tuple[int, Slot]], jax.Array, jax.Array] | None = None

    def submit(self, prompt_ids: list[int], *, max_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop_ids=(), logprobs: bool = False) -> Request:
        """Queue a completion of `prompt_ids`; raises ValueError on a bad argument, QueueFull
        when `max_queue` requests already wait."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: give at least one token (e.g. BOS)")
        check_ids(np.array([prompt]), self.model.config.vocab_size)
        if max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens} must be >= 0")
        if len(prompt) + max_tokens > self.max_len:
            raise ValueError(f"prompt_ids ({len(prompt)} tokens) + max_tokens={max_tokens} is "
                             f"more than this engine's max_len={self.max_len}")
        sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
        seed = random.getrandbits(32) if seed is None else int(seed) % 2**32
        request = Request(prompt, max_tokens, sampling, seed, frozenset(map(int, stop_ids)),
                          bool(logprobs), self._cancel)
        with self._lock:
            if self._stopping or self._error is not None:
                raise RuntimeError("the engine is stopped") from self._error
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (max_queue)")
            if max_tokens == 0:
                request.finish("length")
            else:
                self._waiting.append(request)
                self._lock.notify_all()
        return request

    def warm_up(self, report=None, threads: int | None = None) -> None:
        """Compile the decode step at every width (`decode_widths`) and the prefill at every
        first-chunk width now, before the first request (a server does, before it listens),
        so that no request waits for a compilation. The compilations run ahead of time,
        `threads` at once (default: one per core); then each step runs once on free slots, so
        that its first call is behind it too. `report(done, total, what, seconds)` hears of
        each compilation as it finishes."""
        widths = sorted({first_width(n, self.chunk) for n in range(1, self.chunk + 1)
                         if n < self.max_len})
        jobs = [(f"decode step, {w} row{'s' * (w > 1)}", slots.decode, self._decode_args(w), {})
                for w in self.decode_widths]
        jobs += [(f"prefill, {w} tokens", slots.prefill, self._prefill_args(w), {"first": True})
                 for w in widths]
        if self.max_len > self.chunk:  # a prompt of more than one chunk: its later chunks
            jobs.append((f"prefill, {self.chunk} tokens after the first chunk", slots.prefill,
                         self._prefill_args(self.chunk), {"first": False}))
        jobs += [("freeing a slot", slots.forget, (np.int32(0),), {}),
                 ("moving a slot", slots.move, (np.int32(0), np.int32(0)), {})]

        def call(step, how, args, static):  # how: jitted `step`, or its `.lower`
            lead = () if step in (slots.forget, slots.move) else (self.model,)
            return how(*lead, self._state, *args, **static)

        def compile_one(job):
            what, step, args, static = job
            start = time.perf_counter()
            with on_mesh(self.mesh):
                call(step, step.lower, args, static).compile()
            return what, time.perf_counter() - start

        with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            for done, (what, seconds) in enumerate(pool.map(compile_one, jobs), 1):
                if report is not None:
                    report(done, len(jobs), what, seconds)
        with self._device, on_mesh(self.mesh):
            if any(self._slots) or self._waiting:
                raise RuntimeError("warm_up() runs before the first request")
            for _, step, args, static in jobs:
                out = call(step, step, args, static)
                self._state = out[0] if isinstance(out, tuple) else out
            jax.block_until_ready(self._state)

    def _decode_args(self, width: int) -> tuple:  # (every slot is free: nothing is read)
        zeros = lambda dtype: np.zeros(width, dtype)  # noqa: E731
        return (zeros(bool), zeros(np.int32), zeros(np.int32), zeros(np.uint32),
                zeros(np.int32), RowSampling.of([Sampling()] * width))

    def _prefill_args(self, width: int) -> tuple:
        zeros = np.zeros((1, width), np.int32)
        return np.int32(0), zeros, zeros, zeros, np.int32(0)

    def _cancel(self, request: Request) -> None:
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
            request.finish("cancelled")
            self._lock.notify_all()

    # -- the thread --
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mistral_jax.serving.engine",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel every request, running or waiting, and end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for request in [*self._waiting, *(s.request for s in self._slots if s)]:
                request.finish("cancelled")
            self._waiting.clear()
            self._slots = [None] * self.max_batch

    @property
    def running(self) -> bool:
        """Started, not stopped, and not failed."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and not self._stopping and self._error is None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            with on_mesh(self.mesh):
                while self._next():
                    pass
        except BaseException as error:  # every request learns of it, and submit refuses
            with self._lock:
                self._error = error
                for request in [*self._waiting, *(s.request for s in self._slots if s)]:
                    request.finish("error", error)

    def _next(self) -> bool:
        """One turn of the loop: admit, prefill chunks, one decode step. False: stop."""
        with self._lock:
            self._lock.wait_for(lambda: self._stopping or self._waiting or any(self._slots))
            if self._stopping:
                return False
        with self._device:
            self._turn()
        return True

    def _turn(self) -> None:
        with self._lock:
            for i, slot in enumerate(self._slots):
                if slot is not None and slot.request.done:  # cancelled
                    self._free(i)
            for i in range(self.max_batch):
                if self._slots[i] is None and self._waiting:
                    request = self._waiting.popleft()
                    chunks = prompt_chunks(request.prompt_ids, self.chunk, self.rolling)
                    self._slots[i] = Slot(request, chunks, chunks[0].start, 0, self._admitted)
                    self._admitted += 1
        # prefill chunks first come, first served, one per prompt and up to PREFILL_TURN chunks'
        # tokens a turn (at least one): a burst of prompts gets its first tokens together, and
        # a long prompt goes in a chunk at a time between decode steps
        filling = sorted((i for i, s in enumerate(self._slots) if s and s.chunks),
                         key=lambda i: self._slots[i].admitted)
        budget = total = PREFILL_TURN * self.chunk
        for i in filling:
            width = self._slots[i].chunks[0].ids.shape[1]
            if width > budget and budget < total:
                break
            self._prefill(i)
            budget -= width
        if self._pending is not None or self._stepping():
            self._decode()

    def _prefill(self, i: int) -> None:
        slot = self._slots[i]
        chunk = slot.chunks.pop(0)
        first = slot.position == 0  # nothing of this request is in the row yet
        self._state = slots.prefill(self.model, self._state, np.int32(i), chunk.ids, chunk.valid,
                               chunk.positions, np.int32(chunk.start), first=first)
        slot.position = int(chunk.positions[0, -1]) + 1
        slot.index = slot.chunks[0].start if slot.chunks else chunk.start + chunk.ids.shape[1]

    def _decode(self) -> None:
        """Dispatch a decode step over the stepping slots, then read the previous step's tokens
        while this one runs: a row's next inputs (index, position, token number) do not
        depend on its token, which the step feeds itself on the device. So the host's work
        per token (events, text, HTTP) overlaps the device's, instead of adding to it. A row
        that ends on a token (EOS, a stop) has had one more step computed, whose token is
        dropped; its slot is freed after that step, which it no longer reads."""
        self._compact()
        held, previous = self._slots, self._pending
        self._pending = None
        stepping = [s is not None and s.stepping for s in held]
        if any(stepping):
            width = self._width()
            # the rows of slots not stepping (free, being prefilled, or waiting for the read of
            # their last token) are padding: their write, marked empty, lands where the slot
            # holds nothing, or where its next chunk writes
            rows = range(width)
            per_row = lambda f, dtype: np.array([f(held[i]) if stepping[i] else 0  # noqa: E731
                                                 for i in rows], dtype)
            sampling = RowSampling.of([held[i].request.sampling if stepping[i] else Sampling()
                                       for i in rows])
            index = np.array([held[i].index if held[i] else 0 for i in rows], np.int32)
            self._state, token, logprob = slots.decode(
                self.model, self._state, np.array(stepping[:width]), index,
                per_row(lambda s: s.position, np.int32),
                per_row(lambda s: s.request.seed, np.uint32),
                per_row(lambda s: s.steps, np.int32), sampling)
            for i in rows:
                if stepping[i]:
                    slot = held[i]
                    slot.index, slot.position, slot.steps = \
                        slot.index + 1, slot.position + 1, slot.steps + 1
            self._pending = ([(i, held[i]) for i in rows if stepping[i]], token, logprob)
        if previous is not None:
            self._read(*previous)

    def _read(self, rows: list[tuple[int, Slot]], token, logprob) -> None:
        """A dispatched step's tokens handed to their requests (`rows`: the step's row of each
        slot; a slot may have moved since, or ended)."""
        token, logprob = np.asarray(token), np.asarray(logprob)
        for row, slot in rows:
            if slot.request.done:  # ended on an earlier token, or cancelled
                continue
            slot.request.take(int(token[row]), float(logprob[row]), self.eos)
            if slot.request.done:
                self._free(next(i for i, s in enumerate(self._slots) if s is slot))  # (moved?)

    def _stepping(self) -> list[int]:
        """The slots the next decode step steps (`Slot.stepping`), in order."""
        return [i for i, s in enumerate(self._slots) if s is not None and s.stepping]

    def _width(self) -> int:
        """The decode step's rows: the smallest width that holds every stepping slot."""
        return next(w for w in self.decode_widths if w > self._stepping()[-1])

    def _compact(self) -> None:
        """Move stepping slots down into free ones while that narrows the step."""
        while True:
            decoding = self._stepping()
            free = [i for i, s in enumerate(self._slots) if s is None]
            if not decoding or not free or free[0] > decoding[-1] or \
                    self._width() == next(w for w in self.decode_widths if w >= len(decoding)):
                return
            src, dst = decoding[-1], free[0]
            self._state = slots.move(self._state, np.int32(src), np.int32(dst))
            self._slots[dst], self._slots[src] = self._slots[src], None

    def _free(self, i: int) -> None:
        self._slots[i] = None
        self._state = slots.forget(self._state, np.int32(i))
