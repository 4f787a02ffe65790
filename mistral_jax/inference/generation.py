"""Text generation: bucketed, chunked prefill into a KV cache, then a decode loop inside jit.

Prompts are left-padded to a length bucket (powers of two from 16), so each bucket compiles the
prefill once; prefill runs in chunks no longer than the sliding window, so a long prompt never
builds a T x T score matrix. The decode loop is a `lax.while_loop` over a donated state and
compiles once per (batch, cache size); the host only steps in between segments, to look for stop
strings or to stream text. The command line is `python -m mistral_jax.generate`
(mistral_jax/cli/generate.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.inference.chunks import bucket, prefill_chunks
from mistral_jax.inference.kv_cache import beside, new_cache
from mistral_jax.inference.sampling import Sampling, sample
from mistral_jax.model.apply import check_ids, check_positions, on_mesh
from mistral_jax.model.cache import KVCache
from mistral_jax.nn import layers as L
from mistral_jax.parallel import sharding
from mistral_jax.text.detokenize import CompletionText, cut_at_stop


@jax.tree_util.register_dataclass
@dataclass
class State:
    """Everything the decode loop carries from one token to the next."""

    cache: KVCache
    logits: jax.Array  # [b, vocab] of the last token fed
    position: jax.Array  # [b] RoPE / learned position of the next token
    index: jax.Array  # [] sequence index of the next token (rows are left-aligned)
    done: jax.Array  # [b] bool: the row has produced EOS or hit a stop string
    seen: jax.Array  # [b, vocab] bool: tokens in the row so far (repetition penalty)
    key: jax.Array
    out: jax.Array  # [b, capacity] generated tokens
    n: jax.Array  # [] how many tokens have been generated
    token: jax.Array  # [b] the last token generated (a stream reads it without a dispatch)


@partial(jax.jit, donate_argnums=(1,), static_argnames=("fresh",))
def _prefill(model, cache, ids, valid, positions, start, fresh):
    return model.step(ids, valid, positions, cache, start, fresh)


@partial(jax.jit, static_argnames=("sampling",), donate_argnums=(1,))
def _decode(model, state: State, limit, eos, sampling: Sampling) -> State:
    rows = jnp.arange(state.out.shape[0])

    def body(s: State) -> State:
        key, sub = jax.random.split(s.key)
        token = jnp.where(s.done, eos, sample(s.logits, sub, s.seen, sampling))
        out = jax.lax.dynamic_update_slice(s.out, token[:, None], (0, s.n))
        logits, cache = model.step(token[:, None], jnp.ones_like(token[:, None]),
                                   s.position[:, None], s.cache, s.index)
        return State(cache, logits[:, : model.config.vocab_size], s.position + 1, s.index + 1,
                     s.done | (token == eos), s.seen.at[rows, token].set(True), key, out, s.n + 1,
                     token)

    state = jax.lax.while_loop(lambda s: (s.n < limit) & ~jnp.all(s.done), body, state)
    return state, state.token  # the last token apart: the state is donated to the next call


class Generation:
    """One batch being generated: prefill at construction, then `advance` in segments.

    `prompts` are the rows' token ids, of any lengths; they are left-padded here to the length
    bucket, so that every row's last prompt token is at the same index."""

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int,
                 sampling: Sampling, seed: int):
        config = model.config
        self.model, self.sampling, self.max_new = model, sampling, max_new_tokens
        self.eos = -1 if config.eos_token_id is None else config.eos_token_id
        if not prompts or min(map(len, prompts)) == 0:
            raise ValueError("every prompt needs at least one token (an empty prompt has nothing "
                             "to continue; start it with the BOS token)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        longest = max(map(len, prompts))
        check_positions(config, longest + max_new_tokens,
                        f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens}")
        padded, chunk = prefill_chunks(config, longest)
        b = len(prompts)
        ids, mask = np.zeros((b, padded), np.int32), np.zeros((b, padded), np.int32)
        seen = np.zeros((b, config.vocab_size), bool)  # the prompt's tokens, not its padding
        for row, prompt in enumerate(prompts):
            ids[row, padded - len(prompt):], mask[row, padded - len(prompt):] = prompt, 1
            seen[row, prompt] = True
        positions = np.asarray(L.default_positions(mask))
        capacity = bucket(max_new_tokens)
        self.mesh = sharding.mesh_of(model)  # read once: it walks every weight
        with on_mesh(self.mesh):
            cache = new_cache(model, b, padded + capacity, self.mesh)
            for start in range(0, padded, chunk):
                part = slice(start, start + chunk)
                logits, cache = _prefill(model, cache, ids[:, part], mask[:, part],
                                         positions[:, part], jnp.int32(start), fresh=start == 0)
        state = State(cache, logits[:, : config.vocab_size],
                      np.asarray(mask.sum(axis=1), np.int32), np.int32(padded), np.zeros(b, bool),
                      seen, jax.random.key(seed), np.full((b, capacity), self.eos, np.int32),
                      np.int32(0), np.zeros(b, np.int32))
        # placed as the decode step's outputs are, so its second call finds the first's
        # compilation (an uncommitted input compiles it again: a streamed token took 2 s)
        self.state = _place(state)
        self.n = 0  # tokens asked for so far (the rows may have stopped sooner)

    def advance(self, steps: int) -> jax.Array:
        """Generate up to `steps` more tokens (fewer once every row is done or at the limit);
        dispatched, not waited for. Returns the last token of each row [b] (a row done: EOS),
        an array of its own that the next call does not consume."""
        self.n = min(self.n + steps, self.max_new)
        with on_mesh(self.mesh):
            self.state, token = _decode(self.model, self.state, np.int32(self.n),
                                        np.int32(self.eos), self.sampling)
        return token

    def stop_rows(self, rows: np.ndarray) -> None:
        self.state.done = self.state.done | jnp.asarray(rows)

    @property
    def finished(self) -> bool:
        return self.n >= self.max_new or bool(np.asarray(self.state.done).all())

    def tokens(self) -> np.ndarray:
        """[b, max_new_tokens] generated ids; after EOS (or an early stop), EOS."""
        out = np.array(self.state.out)[:, : self.max_new]
        out[:, int(self.state.n):] = self.eos
        return out


def _place(state: State) -> State:
    """The state's host values placed where the decode step's outputs are."""
    return replace(state, **{f.name: beside(getattr(state, f.name), state.cache)
                             for f in fields(state) if f.name not in ("cache", "logits")})


# --- the public functions ----------------------------------------------------------------------


def generate_tokens(model, input_ids, attention_mask=None, *, max_new_tokens: int = 64,
                    temperature: float = 0.0, top_k=None, top_p=None, repetition_penalty=None,
                    seed: int = 0) -> np.ndarray:
    """New token ids [b, max_new_tokens] for a batch of prompts (padding, left or right, marked
    by `attention_mask`); after a row's EOS, EOS."""
    ids = np.asarray(check_ids(input_ids, model.config.vocab_size))
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    prompts = [row[keep.astype(bool)].tolist() for row, keep in zip(ids, mask, strict=True)]
    run = Generation(model, prompts, max_new_tokens,
                     Sampling(temperature, top_k, top_p, repetition_penalty), seed)
    run.advance(max_new_tokens)
    return run.tokens()


def generate(model, prompt: str | list[str] | None = None, *, messages=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k=None, top_p=None,
             repetition_penalty=None, stop: str | list[str] | None = None, seed: int = 0,
             stream: bool = False):
    """Complete `prompt` (a str -> str, a list -> list, batched) or chat `messages` (one
    conversation, a list of {"role", "content"} -> str, or a list of them -> list, batched).

    Generation ends at EOS, at `max_new_tokens`, or at the first of the `stop` strings (which is
    not included in the text). `stream=True` returns an iterator of text pieces instead.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer: pass token ids to generate_tokens, or "
                         "add tokenizer.model / tokenizer.json to the checkpoint directory")
    if (prompt is None) == (messages is None):
        raise ValueError("pass a prompt or messages, not both")
    if messages is not None:
        from mistral_jax.text.chat_template import encode_chat

        single = not messages or not isinstance(messages[0], list | tuple)
        rows = [encode_chat(tokenizer, m) for m in ([messages] if single else messages)]
    else:
        single = isinstance(prompt, str)
        rows = [tokenizer.encode(p) for p in ([prompt] if single else prompt)]
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if "" in stops:
        raise ValueError("stop strings must not be empty")
    if not rows:
        raise ValueError("prompt is an empty list: give at least one prompt")
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    run = Generation(model, rows, max_new_tokens, sampling, seed)
    if stream:
        if not single:
            raise ValueError("stream=True takes one prompt, not a list")
        return Stream(run, tokenizer, stops, rows[0])
    texts = [CompletionText(tokenizer, p, stops) for p in rows]
    fed = [0] * len(rows)  # tokens of each row pushed into its text so far
    while not run.finished:
        run.advance(16 if stops else max_new_tokens)
        _push(texts, fed, run.tokens(), run.eos)
        run.stop_rows(np.array([t.stopped for t in texts]))
    for text in texts:
        text.flush()
    out = [cut_at_stop(t.text, stops) for t in texts]
    return out[0] if single else out


def _push(texts: list[CompletionText], fed: list[int], tokens: np.ndarray, eos: int) -> None:
    """The rows' new tokens (up to EOS) into their texts, which find the stop strings as they
    grow, a few tokens decoded per token, as a stream does: not the whole completion again."""
    for row, (text, ids) in enumerate(zip(texts, tokens.tolist(), strict=True)):
        for token in ids[fed[row]:]:
            if token == eos or text.stopped:
                break
            text.push(token)
            fed[row] += 1


class Stream:
    """The iterator `generate(..., stream=True)` returns: text pieces as soon as they are
    complete. `times` holds when each token of the completion (EOS not counted) came off the
    device, so `tokens` = len(times) counts tokens, not pieces (a piece may hold several)."""

    def __init__(self, run: Generation, tokenizer, stops: list[str], prompt: list[int]):
        self.run, self.times = run, []
        self._pieces = self._stream(tokenizer, stops, prompt)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def tokens(self) -> int:
        return len(self.times)

    def _stream(self, tokenizer, stops: list[str], prompt: list[int]) -> Iterator[str]:
        """One decode call and one read of its token per token, nothing else to the device;
        the next token's call is dispatched before this one's token is read, so that the
        text, and whatever the caller does with it, overlaps the next step. (A stream that
        stops on a stop string or EOS has computed one token more, unread.)"""
        run, text = self.run, CompletionText(tokenizer, prompt, stops)
        ahead = run.advance(1) if run.n < run.max_new else None
        while ahead is not None and not text.stopped:
            current, ahead = ahead, run.advance(1) if run.n < run.max_new else None
            token = int(np.asarray(current)[0])
            if token == run.eos:
                break
            self.times.append(time.perf_counter())
            if piece := text.push(token):
                yield piece
        if piece := text.flush():
            yield piece
