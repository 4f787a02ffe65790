"""The HTTP server with the real `openai` client (and raw HTTP where the client hides what is
checked) against `generate()`: greedy completions and chat equal it, streamed or not; 16
concurrent requests get what they get alone; a dropped client frees its slot; a full queue is a
429; bad input is a 400 naming the field; SIGTERM ends a running stream cleanly. Every server
runs on 127.0.0.1 on a free port and is stopped; every wait has a timeout."""

import asyncio
import contextlib
import copy
import dataclasses
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
import uvicorn

import mistral_jax
from mistral_jax.serving.app import create_app
from mistral_jax.serving.engine import Engine
from mistral_jax.serving.server import Server

WAIT = 60  # seconds any one request may take
PROMPT = "My favourite condiment is"


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    """conftest's tiny Mistral checkpoint (window 16, 256 positions, a byte-level BPE and a chat
    template), built once for the run."""
    return tiny_ckpt


@pytest.fixture(scope="module")  # module-scoped: `server` serves it
def model(tiny_model):
    return tiny_model


@contextlib.contextmanager
def serving(model, *, start=True, **options):
    """(base URL, engine) of a server on a free port, in a thread; stopped at the end.
    start=False: the engine never runs, so every request waits in its queue."""
    engine = Engine(model, **options)
    if start:
        engine.start()
    config = uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=0,
                            log_level="warning", timeout_graceful_shutdown=30)
    server = Server(config, engine, grace=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.port}", engine
    finally:
        server.should_exit = True
        thread.join(WAIT)
        engine.stop()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(model):
    with serving(model, max_batch=8, max_queue=32) as running:
        yield running


def client(url, cls=openai.OpenAI):
    return cls(base_url=url + "/v1", api_key="none", max_retries=0, timeout=WAIT)


def post(url, path, body, timeout=WAIT):
    """(status, headers, parsed JSON body) of a raw POST; `body` a dict or raw bytes."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def expected(model, prompt=PROMPT, n=12, **kwargs):
    """generate()'s text and the tokens the engine counts (the EOS included)."""
    text = mistral_jax.generate(model, prompt, max_new_tokens=n, **kwargs)
    ids = model.tokenizer.encode(prompt)
    row = mistral_jax.generate_tokens(model, [ids], max_new_tokens=n)[0].tolist()
    eos = model.config.eos_token_id
    return text, len(ids), (row.index(eos) + 1 if eos in row else n)


def test_completions_equal_generate_streamed_or_not(server, model):
    url, _ = server
    text, prompt_tokens, completion_tokens = expected(model)
    assert len(text) > 5
    got = client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                         temperature=0)
    assert got.choices[0].text == text
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        prompt_tokens, completion_tokens)
    assert got.choices[0].finish_reason == ("length" if completion_tokens == 12 else "stop")
    chunks = list(client(url).completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == got.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == got.usage


def test_chat_equals_generate_streamed_or_not(server, model):
    url, _ = server
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is your favourite condiment?"}]
    text = mistral_jax.generate(model, messages=messages, max_new_tokens=10)
    got = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                              temperature=0)
    assert got.choices[0].message.content == text and got.choices[0].message.role == "assistant"
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    chunks = list(client(url).chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_stop_strings_cut_the_text_as_generate_does(server, model):
    url, _ = server
    text = mistral_jax.generate(model, PROMPT, max_new_tokens=16)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = mistral_jax.generate(model, PROMPT, max_new_tokens=16, stop=[stop, "never"])
    assert cut == text[: text.index(stop)]
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "never"])
    got = client(url).completions.create(**kw)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client(url).completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_sampled_tokens(server):
    url, _ = server
    got = client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=6,
                                         temperature=0, logprobs=0)
    logprobs = got.choices[0].logprobs
    sent = got.usage.completion_tokens - (got.choices[0].finish_reason == "stop")
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == sent
    assert all(lp <= 0 for lp in logprobs.token_logprobs)


# 16 requests: prompts of 1 to 16 words, 3 to 24 new tokens, greedy or seeded sampling
WORDS = "the cat sat on a mat while my favourite condiment is salt and pepper with lemon".split()
KINDS = [dict(temperature=0), dict(temperature=0.9, top_k=20, seed=1),
         dict(temperature=1.0, top_p=0.9, seed=2), dict(temperature=0, repetition_penalty=1.3),
         dict(temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.2, seed=3)]
REQUESTS = [(" ".join(WORDS[: 1 + i]), 3 + 7 * i % 22, KINDS[i % 5]) for i in range(16)]


def test_concurrent_requests_get_what_they_get_alone(server, model):
    url, _ = server

    async def one(c, prompt, n, kw, stream):
        extra = {k: kw[k] for k in ("top_k", "repetition_penalty") if k in kw}
        plain = {k: v for k, v in kw.items() if k not in extra}
        if not stream:
            got = await c.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                             extra_body=extra, **plain)
            return got.choices[0].text
        chunks = await c.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                            extra_body=extra, stream=True, **plain)
        return "".join([c.choices[0].text async for c in chunks])

    async def together():
        c = client(url, openai.AsyncOpenAI)
        return await asyncio.wait_for(asyncio.gather(*[
            one(c, p, n, kw, i % 2 == 0) for i, (p, n, kw) in enumerate(REQUESTS)]), WAIT * 2)

    texts = asyncio.run(together())
    sync = client(url)
    for (prompt, n, kw), text in zip(REQUESTS, texts, strict=True):
        if kw.get("temperature"):  # seeded: the same alone
            extra = {k: kw[k] for k in ("top_k", "repetition_penalty") if k in kw}
            plain = {k: v for k, v in kw.items() if k not in extra}
            alone = sync.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                            extra_body=extra, **plain)
            assert alone.choices[0].text == text
        else:
            greedy = {k: v for k, v in kw.items() if k != "temperature"}
            assert text == mistral_jax.generate(model, prompt, max_new_tokens=n, **greedy)
    sampled = [t for (_, _, kw), t in zip(REQUESTS, texts, strict=True) if kw.get("temperature")]
    assert len(set(sampled)) == len(sampled)


PROMPTS = ["My favourite condiment is", "Once upon a time", "The capital of", "Hi",
           "A long time ago, in a galaxy far", "Soup", "Ketchup or mustard? I", "1, 2, 3,"]


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_greedy_serving_equals_generate_in_every_precision(ckpt, precision):
    """One request, then 8 at once, each equal to generate(); after warm_up the requests
    compile nothing (each decode width and prefill width was compiled once, before)."""
    from mistral_jax.serving import slots

    model = mistral_jax.load(ckpt, **({"quantize": "int8"} if precision == "int8" else
                                      {"dtype": precision}))
    want = [mistral_jax.generate(model, p, max_new_tokens=10) for p in PROMPTS]
    with serving(model, max_batch=8) as (url, engine):
        engine.warm_up()
        compiled = slots.decode._cache_size(), slots.prefill._cache_size()

        async def ask(prompts):
            c = client(url, openai.AsyncOpenAI)
            got = await asyncio.gather(*[c.completions.create(
                model="tiny", prompt=p, max_tokens=10, temperature=0) for p in prompts])
            return [g.choices[0].text for g in got]

        assert asyncio.run(ask(PROMPTS[:1])) == want[:1]
        assert asyncio.run(ask(PROMPTS)) == want
        assert (slots.decode._cache_size(), slots.prefill._cache_size()) == compiled


def recording(engine):
    """The engine requests its server submits, in order."""
    submitted, submit = [], engine.submit

    def record(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    engine.submit = record
    return submitted


def test_a_dropped_client_frees_its_slot(model):
    endless = copy.copy(model)  # no EOS: only max_tokens ends a request
    endless.config = dataclasses.replace(model.config, eos_token_id=None)
    with serving(endless, max_batch=1) as (url, engine):
        submitted = recording(engine)
        stream = client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=200,
                                                temperature=0, stream=True)
        for _, _ in zip(range(2), stream, strict=False):
            pass
        stream.close()
        got = client(url).completions.create(model="tiny", prompt="Hi", max_tokens=4,
                                             temperature=0)  # it needs the only slot
        assert got.usage.completion_tokens == 4
        assert submitted[0].finish_reason == "cancelled"
        assert submitted[0].completion_tokens < 200


def test_a_waiting_request_is_cancelled_when_its_client_goes(model):
    with serving(model, start=False) as (url, engine):  # nothing runs: requests wait
        submitted = recording(engine)
        for stream in (False, True):
            with pytest.raises(TimeoutError):
                post(url, "/v1/completions", {"prompt": "Hi", "stream": stream}, timeout=0.5)
        deadline = time.monotonic() + WAIT
        while not all(r.finish_reason == "cancelled" for r in submitted):
            assert time.monotonic() < deadline, [r.finish_reason for r in submitted]
            time.sleep(0.05)
        assert len(submitted) == 2


def test_a_full_queue_answers_429_with_retry_after(model):
    with serving(model, start=False, max_queue=1) as (url, _):
        def wait_then_go():  # queued, until its client gives up
            with contextlib.suppress(TimeoutError):
                post(url, "/v1/completions", {"prompt": "Hi"}, timeout=1.0)

        waiting = threading.Thread(target=wait_then_go)
        waiting.start()
        time.sleep(0.5)  # it is queued
        status, headers, body = post(url, "/v1/completions", {"prompt": "Hi"})
        assert status == 429 and headers["retry-after"] == "1"
        assert body["error"]["type"] == "rate_limit_error" and "max_queue" in \
            body["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            client(url).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}])
        waiting.join(WAIT)


LONG = " ".join(["salt"] * 300)
BAD = [  # (route, body, field, words in the message)
    ("completions", b'{"prompt": "Hi", ', None, "malformed JSON"),
    ("completions", {"prompt": "Hi", "max_tokens": -1}, "max_tokens", "max_tokens=-1"),
    ("completions", {"prompt": "Hi", "temperature": -1}, "temperature", "temperature=-1"),
    ("completions", {"prompt": "Hi", "top_p": 1.5}, "top_p", "top_p=1.5"),
    ("completions", {"prompt": "Hi", "top_k": 0}, "top_k", "top_k=0"),
    ("completions", {"prompt": "Hi", "n": 2}, "n", "n:"),
    ("completions", {"prompt": "Hi", "stream": "maybe"}, "stream", "stream:"),
    ("completions", {"prompt": "Hi", "best_of": 3}, "best_of", "best_of:"),
    ("completions", {"prompt": "Hi", "stop": ""}, "stop", "stop"),
    ("completions", {"prompt": "Hi", "logprobs": 3}, "logprobs", "logprobs:"),
    ("completions", {"prompt": [5, 100000]}, "prompt", "token id 100000"),
    ("completions", {"max_tokens": 3}, "prompt", "prompt:"),
    ("completions", {"prompt": LONG}, "prompt", "limit (--max-len) is 256 tokens"),
    ("completions", {"prompt": "Hi", "max_tokens": 300}, "max_tokens", "(--max-len) of 256"),
    ("chat/completions", {"messages": []}, "messages", "messages:"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages",
     "messages.0.role"),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages",
     "limit (--max-len) is 256"),
]


@pytest.mark.parametrize("route,body,field,words", BAD,
                         ids=[f"{r}-{f}-{i}" for i, (r, _, f, _) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(server, route, body, field, words):
    url, _ = server
    status, _, got = post(url, f"/v1/{route}", body)
    assert status == 400, got
    error = got["error"]
    assert error["param"] == field and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_models_health_and_unknown_routes(server):
    url, _ = server
    assert [m.id for m in client(url).models.list()] == ["tiny"]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    status, _, body = post(url, "/v1/nothing", {})
    assert status == 404 and body["error"]["type"] == "not_found_error"


def test_sigterm_ends_a_running_stream_cleanly(ckpt, tmp_path):
    """As a user runs it: `python -m mistral_jax.serve` from the checkpoint's parent with a
    relative path; SIGTERM while a stream runs: the stream still ends with [DONE], the
    process exits, nothing on stderr is a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        [sys.executable, "-m", "mistral_jax.serve", ckpt.name, "--port", "0",
         "--shutdown-grace", "0.5", "--max-batch", "1"],  # one slot: one decode step to warm up
        cwd=ckpt.parent, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port, lines = None, []
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
            found = re.search(r"running on http://127.0.0.1:(\d+)", line)
            port = found and int(found.group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": PROMPT, "max_tokens": 240, "stream": True, "seed": 0}).encode(),
            {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data: {")
        process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        conn.close()
        events = [e for e in (first.decode() + rest).split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] in ("cancelled", "length", "stop")
        assert process.wait(WAIT) in (0, -signal.SIGTERM)
        stderr = "".join(lines) + process.stderr.read()
        assert "Traceback" not in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
