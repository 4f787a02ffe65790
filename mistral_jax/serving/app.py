"""The FastAPI app: OpenAI's /v1/completions and /v1/chat/completions (JSON, or Server-Sent
Events as the `openai` client reads them), /v1/models and /health, over one `Engine`.

A handler tokenizes, submits to the engine (no device work: the engine's thread does it) and
reads the request's tokens asynchronously, turning them into text with `CompletionText`, which
also finds stop strings; a stop string cancels the engine request. A client that goes away
cancels its request, so its slot is free for the next step. Errors are answered in OpenAI's
format: 400 naming the field, 429 with Retry-After when the engine's queue is full.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mistral_jax.serving.engine import Engine, Event, QueueFull
from mistral_jax.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Reply,
    Sampled,
    model_list,
    usage,
)
from mistral_jax.serving.request import Request
from mistral_jax.text.chat_template import encode_chat
from mistral_jax.text.detokenize import CompletionText

RETRY_AFTER_S = 1  # what a 429 asks the client to wait
DISCONNECT_POLL_S = 0.2  # how often a non-streaming handler checks that its client is still there


class Job:
    """One engine request and its text."""

    def __init__(self, request: Request, text: CompletionText):
        self.request, self.text = request, text
        self.received = 0  # events read
        self.finish_reason: str | None = None

    async def pieces(self) -> AsyncIterator[tuple[str, list[Event]]]:
        """(text now final, the events since the last piece), then `finish_reason` is set."""
        events, piece = [], ""
        async for event in self.request:
            self.received += 1
            events.append(event)
            piece = self.text.push(event.token)
            if self.text.stopped:
                self.request.cancel()  # the stop string ends it, not the engine
                break
            if piece:
                yield piece, events
                events, piece = [], ""
        else:
            piece = self.text.flush()
        if piece or events:
            yield piece, events
        self.finish_reason = "stop" if self.text.stopped else self.request.finish_reason

    def usage(self) -> dict:
        # a stop string's tokens are those read; else the engine's count, with the EOS it ate
        done = self.received if self.text.stopped else self.request.completion_tokens
        return usage(self.request.prompt_tokens, done)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(engine: Engine, name: str) -> FastAPI:
    """The app serving `engine`'s model as `name`. The caller starts and stops the engine."""
    tokenizer = engine.model.tokenizer
    if tokenizer is None:
        raise ValueError("serving needs a tokenizer: add tokenizer.model / tokenizer.json to "
                         "the checkpoint directory")
    app, created = FastAPI(title="mistral_jax", docs_url=None, redoc_url=None), int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        first = error.errors()[0]
        loc = [str(part) for part in first.get("loc", ())[1:]]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"malformed JSON: {first.get('msg')}"))
        where = ".".join(loc) or "body"
        return error_response(APIError(400, f"{where}: {first.get('msg')}",
                                       loc[0] if loc else None))

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(APIError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(Exception)
    async def crashed(_, error: Exception):
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}",
                                       type="server_error"))

    @app.get("/health")
    async def health():
        if not engine.running:
            raise APIError(503, "the engine is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return model_list(name, created)

    def submit(prompt: list[int], body: Sampled, max_tokens: int | None, prompt_field: str,
               logprobs: bool = False) -> Job:
        limit, stops = engine.max_len, body.stops()
        if len(prompt) >= limit:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this server's limit "
                           f"(--max-len) is {limit} tokens, prompt and completion together",
                           prompt_field, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - len(prompt)
        elif len(prompt) + max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} with a prompt of {len(prompt)} tokens "
                           f"is more than this server's limit (--max-len) of {limit} tokens",
                           "max_tokens", code="context_length_exceeded")
        try:
            request = engine.submit(prompt, max_tokens=max_tokens, logprobs=logprobs,
                                    **body.sampling())
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ValueError as e:  # the engine names the field: `top_p=1.5 must be ...`
            field = re.match(r"(\w+)=", str(e))
            raise APIError(400, str(e), field.group(1) if field else prompt_field) from None
        return Job(request, CompletionText(tokenizer, prompt, stops))

    async def collect(job: Job, http: HTTPRequest) -> tuple[str, list[Event]]:
        """The whole text and events; the request is cancelled if the client goes away."""

        async def watch():
            while not await http.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            job.request.cancel()

        watcher = asyncio.create_task(watch())
        text, events = "", []
        try:
            async for piece, got in job.pieces():
                text, events = text + piece, events + got
        finally:
            watcher.cancel()
            job.request.cancel()
        return text, events

    def stream(job: Job, reply: Reply, body: Sampled, chunk) -> StreamingResponse:
        """SSE: `chunk(piece, events, finish_reason)` per piece, the last with the reason;
        with include_usage every chunk has usage null and a last chunk has it; then [DONE]."""
        extra = {"usage": None} if body.include_usage else {}

        async def events() -> AsyncIterator[str]:
            try:
                first = chunk(None, [], None)  # chat: the assistant's role
                if first is not None:
                    yield sse(reply.body([first], chunk=True, **extra))
                async for piece, got in job.pieces():
                    yield sse(reply.body([chunk(piece, got, None)], chunk=True, **extra))
                yield sse(reply.body([chunk("", [], job.finish_reason)], chunk=True, **extra))
                if body.include_usage:
                    yield sse(reply.body([], chunk=True, usage=job.usage()))
                yield sse("[DONE]")
            except Exception as e:  # the engine failed: tell the client, in its format
                yield sse(APIError(500, f"generation failed: {e}", type="server_error").body())
            finally:  # also when the client disconnects (Starlette cancels this generator)
                job.request.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def logprobs_of(events: list[Event]) -> dict:
        return {"tokens": [tokenizer.id_to_piece(e.token) for e in events],
                "token_logprobs": [e.logprob for e in events], "top_logprobs": None,
                "text_offset": None}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        with_logprobs = body.logprobs is not None
        job = submit(prompt, body, body.max_tokens, "prompt", with_logprobs)
        reply = Reply("text_completion", name)

        def choice(text, events, finish_reason):
            if text is None:
                return None
            return {"index": 0, "text": text, "finish_reason": finish_reason,
                    "logprobs": logprobs_of(events) if with_logprobs else None}

        if body.stream:
            return stream(job, reply, body, choice)
        text, events = await collect(job, http)
        return reply.body([choice(text, events, job.finish_reason)], usage=job.usage())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            prompt = encode_chat(tokenizer, messages)
        except ValueError as e:  # roles out of order, a template without a system role, ...
            raise APIError(400, str(e), "messages") from None
        most = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        job = submit(prompt, body, most, "messages")
        reply = Reply("chat.completion", name)

        def delta(text, events, finish_reason):
            content = {"role": "assistant", "content": ""} if text is None else (
                {"content": text} if text else {})
            return {"index": 0, "delta": content, "logprobs": None,
                    "finish_reason": finish_reason}

        if body.stream:
            return stream(job, reply, body, delta)
        text, _ = await collect(job, http)
        message = {"role": "assistant", "content": text}
        return reply.body([{"index": 0, "message": message, "logprobs": None,
                            "finish_reason": job.finish_reason}], usage=job.usage())

    return app
