"""One request's stream of tokens, handed from the engine's thread to whoever consumes it: a
blocking iterator (tests, command lines) or an async one (a server), without polling: the
engine thread wakes an asyncio consumer with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

from mistral_jax.inference.sampling import Sampling


@dataclass(frozen=True)
class Event:
    token: int
    logprob: float | None = None  # log-probability under the model's distribution, if asked


@dataclass(eq=False)
class Request:
    """What `Engine.submit` returns. Iterate it (`async for event in request`, or `for` in a
    thread) for its `Event`s; `finish_reason` is then "stop" (EOS or a stop id, which is not
    sent), "length" (max_tokens reached) or "cancelled"."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int
    stop_ids: frozenset[int]
    logprobs: bool
    _cancel: Callable[[Request], None] = field(repr=False)
    completion_tokens: int = 0  # generated, the stopping token included
    finish_reason: str | None = None
    error: BaseException | None = field(default=None, repr=False)
    _events: list[Event] = field(default_factory=list, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _wakers: list = field(default_factory=list, repr=False)  # (loop, asyncio.Event) of consumers

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """End the request now (a no-op once it is done); the engine frees its slot before its
        next step."""
        self._cancel(self)

    # -- the engine's side --
    def take(self, token: int, logprob: float, eos: int) -> None:
        """A generated token: sent, or the end of the request."""
        if self.done:
            return
        self.completion_tokens += 1
        if token == eos or token in self.stop_ids:
            self.finish("stop")
            return
        self._push(Event(token, logprob if self.logprobs else None))
        if self.completion_tokens >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        self._push(None, reason, error)

    def _push(self, event: Event | None, reason: str | None = None, error=None) -> None:
        with self._cond:
            if self.done:
                return
            if event is not None:
                self._events.append(event)
            if reason is not None:
                self.finish_reason, self.error = reason, error
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, wake in wakers:
            loop.call_soon_threadsafe(wake.set)

    # -- the consumer's side --
    def _ready(self, seen: int) -> bool:
        return seen < len(self._events) or self.done

    def _next(self, seen: int) -> Event | None:
        """The event after the first `seen`, None at the end; call under the lock, when ready."""
        if seen < len(self._events):
            return self._events[seen]
        if self.error is not None:
            raise RuntimeError("the engine failed while running this request") from self.error
        return None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events as they come, blocking; TimeoutError when none comes for `timeout` s."""
        seen = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(partial(self._ready, seen), timeout):
                    raise TimeoutError(f"no token for {timeout} s")
                event = self._next(seen)
            if event is None:
                return
            seen += 1
            yield event

    __iter__ = events

    def tokens(self, timeout: float | None = None) -> list[int]:
        """The completion's token ids, once it is done (blocking)."""
        return [event.token for event in self.events(timeout)]

    async def _aevents(self) -> AsyncIterator[Event]:
        wake = asyncio.Event()
        waker = (asyncio.get_running_loop(), wake)
        with self._cond:
            self._wakers.append(waker)
        try:
            seen = 0
            while True:
                with self._cond:
                    ready = self._ready(seen)
                    event = self._next(seen) if ready else None
                    if not ready:
                        wake.clear()  # under the lock: a push after this sets it again
                if not ready:
                    await wake.wait()
                    continue
                if event is None:
                    return
                seen += 1
                yield event
        finally:
            with self._cond:
                self._wakers.remove(waker)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aevents()
