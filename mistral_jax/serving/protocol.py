"""OpenAI's request and response shapes (https://platform.openai.com/docs/api-reference:
completions, chat completions, models) as pydantic models, and its error body
`{"error": {"message", "type", "param", "code"}}`.

Requests refuse fields OpenAI does not define or this server does not implement (400, the field
named), so that nothing a client asks for is silently ignored."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered in OpenAI's format: `status` with {"error": {...}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampled(BaseModel):
    """What both routes take. `temperature` defaults to 1, as OpenAI's does (0 is greedy)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # one model is served: any name is taken for it
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's; as vLLM and llama.cpp's servers take it
    repetition_penalty: float | None = None  # likewise
    stop: str | list[str] | None = Field(default=None, max_length=4)
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if "" in stops:
            raise APIError(400, "stop strings must not be empty", "stop")
        return stops

    def sampling(self) -> dict:
        """Engine.submit's sampling arguments (the engine checks their values)."""
        return dict(temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=self.top_p, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty, seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampled):
    prompt: str | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: Literal[0] | None = None  # the sampled token's log-probability; no alternatives


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens).model_dump()


class Reply:
    """The id, time and model every response and stream chunk of one request carries."""

    def __init__(self, kind: Literal["text_completion", "chat.completion"], model: str):
        prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
        self.kind, self.model = kind, model
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def body(self, choices: list[dict], chunk: bool = False, **more) -> dict:
        """A response, or a stream chunk, around its choices; `more`: usage."""
        kind = "chat.completion.chunk" if chunk and self.kind == "chat.completion" else self.kind
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **more}


def model_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "mistral_jax"}]}
