"""The continuous-batching engine against `generate_tokens` and against itself alone: greedy
token for token, seeded sampling reproducible whatever runs beside it, compilations counted,
cancellation, the queue bound, a mesh. Every wait has a timeout; every engine is stopped."""

import asyncio
import copy
import dataclasses

import jax
import numpy as np
import pytest

import mistral_jax
from mistral_jax.inference.sampling import RowSampling, Sampling, sample, sample_rows
from mistral_jax.model.options import with_options
from mistral_jax.quant import int8 as quant
from mistral_jax.serving import engine as eng
from mistral_jax.serving import slots
from mistral_jax.serving.engine import Engine, QueueFull
from tests.reference import prompt

WAIT = 120  # seconds any one wait may take before the test fails


@pytest.fixture
def engines():
    """make(model, **options) -> a started Engine, stopped when the test ends."""
    made = []

    def make(model, **options):
        made.append(Engine(model, **options).start())
        return made[-1]

    try:
        yield make
    finally:
        for engine in made:
            engine.stop()


def compiled() -> dict:
    """Executables the engine's jitted steps hold (compilations, sharding variants included)."""
    return {"decode": slots.decode._cache_size(), "prefill": slots.prefill._cache_size()}


def alone(model, ids, n, **sampling):
    """generate_tokens' completion cut before EOS, and the finish reason the engine gives."""
    row = mistral_jax.generate_tokens(model, [ids], max_new_tokens=n, **sampling)[0].tolist()
    eos = model.config.eos_token_id
    return (row[: row.index(eos)], "stop") if eos in row else (row, "length")


def result(request):
    return request.tokens(timeout=WAIT), request.finish_reason


def test_the_per_row_sampler_is_sample_row_by_row():
    """sample_rows with each row's options and key draws what `sample` draws for that row alone
    (so transformers' distribution, tested in test_generate), greedy rows included."""
    logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 3
    seen = np.random.default_rng(1).random((6, 50)) < 0.2
    rows = [Sampling(), Sampling(0.7, 5), Sampling(1.0, None, 0.7), Sampling(0.0, None, None, 1.5),
            Sampling(0.8, 10, 0.5, 1.3), Sampling(1.2, 50, 1.0, 0.8)]

    @jax.jit  # both samplers in one program (the engine's and generate's steps are jitted)
    def draw(keys):
        return sample_rows(logits, keys, seen, RowSampling.of(rows)), [
            sample(logits[i:i + 1], keys[i], seen[i:i + 1], s)[0] for i, s in enumerate(rows)]

    for k in range(10):
        got, alone = draw(jax.random.split(jax.random.key(k), len(rows)))
        assert np.asarray(got).tolist() == [int(a) for a in alone]


# each engine as other tests build it, so their compilations are shared: GPT-2's 2 slots (as
# in the warm-up test) for 3 requests: the third waits and takes a freed slot (Mistral's
# requests wait for slots in test_concurrent_requests_get_what_they_get_alone)
@pytest.mark.parametrize("name,max_batch", [("mistral", 8), ("gpt2", 2)])
def test_greedy_equals_generate_tokens(models_, engines, name, max_batch):
    # Mistral's window is 4: prompts of 9 and 21 wrap the rolling buffer
    _, model = models_[name]
    engine = engines(model, max_batch=max_batch)
    prompts = [prompt(n, seed=n)[0].tolist() for n in (3, 9, 21)]
    requests = [engine.submit(p, max_tokens=12) for p in prompts]
    for p, request in zip(prompts, requests, strict=True):
        tokens, reason = result(request)
        assert (tokens, reason) == alone(model, p, 12)
        counted = len(tokens) + (reason == "stop")  # the EOS is generated, not sent
        assert (request.prompt_tokens, request.completion_tokens) == (len(p), counted)


# 16 requests: prompt lengths from 3 to 40 (GPT-2's prefill chunk of 32: first chunks of 16 and
# 32 tokens, and prompts of two chunks), up to 20 new tokens, five kinds of sampling
KINDS = [dict(), dict(temperature=0.8, top_k=20), dict(temperature=1.0, top_p=0.9),
         dict(repetition_penalty=1.3), dict(temperature=0.7, top_k=5, top_p=0.8,
                                            repetition_penalty=1.2)]
REQUESTS = [(3 + 37 * i // 15, 4 + 7 * i % 17, dict(KINDS[i % 5], seed=100 + i))
            for i in range(16)]


# prefill compilations: each first-chunk width (attending to itself), and the chunk width of
# the chunks after a first (attending to the cache too)
@pytest.mark.parametrize("name,chunk,buckets", [("mistral", None, 2), ("gpt2", 32, 3)])
def test_concurrent_requests_get_what_they_get_alone(models_, engines, name, chunk,
                                                     buckets):
    _, model = models_[name]
    jax.clear_caches()
    engine = engines(model, max_batch=8, max_queue=16, prefill_chunk=chunk)
    prompts = [prompt(n, seed=i)[0].tolist() for i, (n, _, _) in enumerate(REQUESTS)]
    together = [engine.submit(p, max_tokens=n, logprobs=True, **kw)
                for p, (_, n, kw) in zip(prompts, REQUESTS, strict=True)]
    together = [result(r) for r in together]
    for p, (_, n, kw), got in zip(prompts, REQUESTS, together, strict=True):
        for _ in range(2):  # alone, twice
            assert result(engine.submit(p, max_tokens=n, **kw)) == got
        if "temperature" not in kw:
            greedy = {k: v for k, v in kw.items() if k != "seed"}
            assert got == alone(model, p, n, **greedy)
    sampled = [got for (_, _, kw), got in zip(REQUESTS, together, strict=True)
               if "temperature" in kw]
    assert len({tuple(tokens) for tokens, _ in sampled}) == len(sampled)  # really sampled
    # the decode step compiles once per width of live rows it met (1, 2, 4, 8 slots), no more
    assert 1 <= compiled()["decode"] <= len(slots.decode_widths(8)) == 4
    assert compiled()["prefill"] == buckets


def test_int8_weights_and_kv_cache_serve_what_generate_gives(models_, engines):
    """The engine's per-row cache writes and freed slots with int8 keys, values and scales:
    each request gets what generate gives with the same int8 cache; and the int8 cache is the
    one read, so the log-probabilities move (a little) from those over a float32 cache."""
    _, model = models_["mistral"]
    float_kv = quant.quantized(model)
    int8 = with_options(float_kv, kv_cache_dtype="int8")
    prompts = [prompt(n, seed=n)[0].tolist() for n in (3, 9, 21)]

    def served(m):
        engine = engines(m, max_batch=2)
        requests = [engine.submit(p, max_tokens=12, logprobs=True) for p in prompts]
        events = [list(r.events(timeout=WAIT)) for r in requests]
        return ([([e.token for e in ev], r.finish_reason) for ev, r in zip(events, requests,
                                                                          strict=True)],
                [[e.logprob for e in ev] for ev in events])

    got, logprobs = served(int8)
    assert got == [alone(int8, p, 12) for p in prompts]
    got_float, logprobs_float = served(float_kv)
    moved = []  # |int8 - float32| for each token both caches chose alike so far
    for (a, _), (b, _), la, lb in zip(got, got_float, logprobs, logprobs_float, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                    min(len(a), len(b)))
        moved += np.abs(np.subtract(la[:same], lb[:same])).tolist()
    assert len(moved) >= 12 and 1e-6 < max(moved) < 0.1, moved


def test_prompt_widths_and_their_layout():
    """First chunks pad to a power of two up to 64, then to a multiple of 64; a prompt starts at
    index 0 unless the cache is a rolling buffer, where every chunk but the first starts at a
    multiple of the chunk."""
    assert [eng.first_width(n, 512) for n in (1, 5, 17, 64, 65, 136, 200, 512)] == \
        [16, 16, 32, 64, 128, 192, 256, 512]
    assert eng.first_width(100, 32) == 32
    chunks = eng.prompt_chunks(list(range(70)), 32, rolling=False)  # 6 + 32 + 32 tokens
    assert [(c.start, c.ids.shape[1]) for c in chunks] == [(0, 16), (16, 32), (48, 32)]
    assert chunks[0].valid.tolist() == [[0] * 10 + [1] * 6]
    chunks = eng.prompt_chunks(list(range(70)), 32, rolling=True)
    assert [(c.start, c.ids.shape[1]) for c in chunks] == [(16, 16), (32, 32), (64, 32)]
    for rolling in (False, True):  # the prompt's tokens, in order, each at its own position
        chunks = eng.prompt_chunks(list(range(70)), 32, rolling)
        ids = np.concatenate([c.ids[c.valid > 0] for c in chunks])
        positions = np.concatenate([c.positions[c.valid > 0] for c in chunks])
        assert ids.tolist() == positions.tolist() == list(range(70))


def test_warm_up_compiles_every_width_and_a_freed_slot_is_emptied(models_, engines,
                                                                   monkeypatch):
    _, model = models_["gpt2"]
    jax.clear_caches()
    engine = engines(model, max_batch=2)  # GPT-2's 64 positions: a chunk of 64
    heard = []
    engine.warm_up(lambda done, total, what, seconds: heard.append((done, total, what)))
    # decode widths 1 and 2; prefill widths 16, 32 and 64 (a 63-token prompt)
    assert compiled() == {"decode": 2, "prefill": 3}
    assert heard == [(1, 7, "decode step, 1 row"), (2, 7, "decode step, 2 rows"),
                     (3, 7, "prefill, 16 tokens"), (4, 7, "prefill, 32 tokens"),
                     (5, 7, "prefill, 64 tokens"), (6, 7, "freeing a slot"),
                     (7, 7, "moving a slot")]
    emptied = []  # (slot, its row of the cache index once forgotten: all -1, nothing to read)
    real_forget = slots.forget

    def forget(state, slot):
        state = real_forget(state, slot)
        emptied.append((int(slot), bool((np.asarray(state.cache.index)[int(slot)] == -1).all())))
        return state

    monkeypatch.setattr(slots, "forget", forget)
    requests = [engine.submit(prompt(n, seed=n)[0].tolist(), max_tokens=3)
                for n in (1, 9, 17, 31, 40, 60)]
    for request in requests:
        result(request)
    assert compiled() == {"decode": 2, "prefill": 3}  # the requests compiled nothing
    engine.stop()  # (its thread ends after the turn that freed the last slot)
    # every request's slot was freed when it ended (slot 0: a request left in slot 1 moves down)
    assert len(emptied) == len(requests)
    assert all(empty for _, empty in emptied), emptied


def test_a_request_left_in_a_high_slot_moves_down_and_still_gets_what_it_gets_alone(
        models_, engines, monkeypatch):
    """The short request in the first slot ends; the long one in the last slot moves to the
    first, so the step narrows to one row, and its tokens are those it gets alone. (Two
    slots, as the warm-up test's engine: its compilations serve this one.)"""
    _, model = models_["gpt2"]
    model = copy.copy(model)
    model.config = dataclasses.replace(model.config, eos_token_id=None)
    moves = []
    real_move = slots.move
    monkeypatch.setattr(slots, "move", lambda state, src, dst: (
        moves.append((int(src), int(dst))), real_move(state, src, dst))[1])
    engine = engines(model, max_batch=2)
    prompts = [prompt(n, seed=n)[0].tolist() for n in (3, 9)]
    requests = [engine.submit(p, max_tokens=n) for p, n in zip(prompts, (2, 30), strict=True)]
    got = [result(r)[0] for r in requests]
    assert got[1] == alone(model, prompts[1], 30)[0] and len(got[1]) == 30
    assert moves == [(1, 0)]  # down, to the free slot


def test_seed_changes_the_sample_and_logprobs_are_the_models(models_, engines):
    _, model = models_["mistral"]
    engine = engines(model)
    ids = prompt(6)[0].tolist()
    runs = [engine.submit(ids, max_tokens=8, temperature=1.0, seed=s, logprobs=True)
            for s in (1, 1, 2)]
    events = [list(r.events(timeout=WAIT)) for r in runs]
    assert events[0] == events[1] and events[0] != events[2]
    tokens = [e.token for e in events[0]]
    logits = np.asarray(mistral_jax.forward(model, [ids + tokens]))[0, len(ids) - 1: -1]
    logits = logits.astype(np.float64)  # each logprob: log_softmax of the logits at its step
    expected = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose([e.logprob for e in events[0]],
                               expected[np.arange(len(tokens)), tokens], atol=1e-4)


def test_running_requests_decode_while_a_prompt_is_prefilled(models_, engines):
    _, model = models_["mistral"]
    model = copy.copy(model)
    model.config = dataclasses.replace(model.config, eos_token_id=None)  # no early stop
    engine = engines(model)
    running = engine.submit(prompt(5)[0].tolist(), max_tokens=110)
    next(iter(running.events(timeout=WAIT)))
    before = running.completion_tokens
    long = engine.submit(prompt(100, seed=1)[0].tolist(), max_tokens=4)  # 25 chunks of 4
    next(iter(long.events(timeout=WAIT)))
    assert running.completion_tokens - before >= 25  # a decode step after each chunk
    assert result(long)[0] == alone(model, prompt(100, seed=1)[0].tolist(), 4)[0]
    assert result(running) == alone(model, prompt(5)[0].tolist(), 110)


def test_cancelling_frees_the_slot(models_, engines):
    _, model = models_["mistral"]
    model = copy.copy(model)  # no EOS: the first request runs until it is cancelled
    model.config = dataclasses.replace(model.config, eos_token_id=None)
    engine = engines(model, max_batch=1)
    ids = prompt(5)[0].tolist()
    first = engine.submit(ids, max_tokens=100)
    waiting = engine.submit(ids[:3], max_tokens=6)
    dropped = engine.submit(ids[:4], max_tokens=6)
    dropped.cancel()  # still waiting: it never takes the slot

    async def two_then_disconnect():  # what a server does when its client goes away
        got = []
        try:
            async for event in first:
                got.append(event.token)
                if len(got) == 2:
                    break
        finally:
            first.cancel()
        return got

    got = asyncio.run(asyncio.wait_for(two_then_disconnect(), WAIT))
    assert got == alone(model, ids, 2)[0]
    assert result(waiting) == alone(model, ids[:3], 6)  # it took the freed slot
    assert first.finish_reason == dropped.finish_reason == "cancelled"
    assert first.completion_tokens < 100 and dropped.completion_tokens == 0


def test_the_queue_is_bounded(models_):
    _, model = models_["gpt2"]
    engine = Engine(model, max_queue=2)  # not started: everything waits
    try:
        waiting = [engine.submit([5, 6], max_tokens=4) for _ in range(2)]
        with pytest.raises(QueueFull, match="max_queue"):
            engine.submit([5, 6], max_tokens=4)
        waiting[0].cancel()  # a cancelled request leaves the queue
        waiting.append(engine.submit([5, 6], max_tokens=4))
    finally:
        engine.stop()
    assert [r.finish_reason for r in waiting] == ["cancelled"] * 3
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit([5, 6], max_tokens=4)


@pytest.mark.parametrize("option", ["max_batch", "max_len", "max_queue", "prefill_chunk"])
def test_bad_engine_options_name_the_option(models_, option):
    with pytest.raises(ValueError, match=f"{option}=0 must be >= 1"):
        Engine(models_["gpt2"][1], **{option: 0})
    with pytest.raises(ValueError, match="needs 65 positions"):
        Engine(models_["gpt2"][1], max_len=65)  # GPT-2 learned 64


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt_ids=[]), "prompt_ids"), (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=60), "max_len"), (dict(prompt_ids=[5, 500]), "token id 500"),
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0.0), "repetition_penalty")])
def test_bad_requests_name_the_field(models_, kwargs, field):
    _, model = models_["gpt2"]  # 64 positions
    engine = Engine(model)
    try:
        with pytest.raises(ValueError, match=field):
            engine.submit(**{"prompt_ids": [5] * 8, "max_tokens": 4, **kwargs})
    finally:
        engine.stop()


def test_sharded_engine_generates_the_same_tokens(models_, engines):
    # 2x2: the model axis of 2 (as 1x2 alone would shard it: a 1x2 case proved nothing more)
    # and the data axis over the slots
    _, model = models_["mistral"]
    sharded = mistral_jax.shard(model, mistral_jax.make_mesh("2x2"))
    engine = engines(sharded, max_batch=4)
    prompts = [prompt(n, seed=n)[0].tolist() for n in (4, 11)]
    requests = [engine.submit(p, max_tokens=10) for p in prompts]
    for p, request in zip(prompts, requests, strict=True):
        assert result(request) == alone(model, p, 10)
