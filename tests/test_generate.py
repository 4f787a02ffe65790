"""Generation against transformers' generate, against recomputing without a cache, across
batching, sharding and sampling options, and counted compilations."""

import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import mistral_jax
from mistral_jax.inference import chunks
from mistral_jax.inference import generation as gen
from mistral_jax.inference.sampling import Sampling, sample
from mistral_jax.parallel import sharding
from tests.reference import WINDOWED, hf_model, prompt


def hf_greedy(model, ids, n, **kwargs):
    """transformers' greedy generate; after EOS (the config's), EOS, as generate_tokens gives."""
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                             max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=eos,
                             pad_token_id=eos, **kwargs)
    out = out[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=eos)


@pytest.mark.parametrize("name", ["mistral", "gpt2", "llama"])
@pytest.mark.parametrize("length,new", [(3, 8), (7, 30), (21, 12)])
def test_greedy_equals_transformers_generate(models_, name, length, new):
    # (3, 8): a prompt shorter than the window; (7, 30) and (21, 12): several windows of 4
    theirs, mine = models_[name]
    ids = prompt(length, seed=length)
    expected = hf_greedy(theirs, ids, new)
    assert len(set(expected[0].tolist())) > 2  # a sequence worth comparing
    np.testing.assert_array_equal(mistral_jax.generate_tokens(mine, ids, max_new_tokens=new),
                                  expected)


def test_long_prompt_prefills_in_causal_query_blocks(models_):
    # 300 tokens pad to one 512-token chunk: four query blocks of 128, the first all padding
    theirs, mine = models_["llama"]
    ids = prompt(300, seed=3)
    expected = hf_greedy(theirs, ids, 8)
    np.testing.assert_array_equal(mistral_jax.generate_tokens(mine, ids, max_new_tokens=8),
                                  expected)


def test_repetition_penalty_equals_transformers(models_):
    theirs, mine = models_["mistral"]
    ids = prompt(6, seed=1)
    expected = hf_greedy(theirs, ids, 20, repetition_penalty=1.5)
    got = mistral_jax.generate_tokens(mine, ids, max_new_tokens=20, repetition_penalty=1.5)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["mistral", "gpt2"])
def test_cached_decoding_equals_recomputing_every_step(models_, name):
    _, mine = models_[name]
    ids = prompt(5, seed=3)
    got = mistral_jax.generate_tokens(mine, ids, max_new_tokens=24)
    # every step the whole sequence again, no cache; held right-padded at its final width, so
    # one program serves every step (position t's logits see the tokens up to t alone)
    seq = np.zeros((ids.shape[0], 5 + 24), ids.dtype)
    seq[:, :5] = ids
    for t in range(5, 5 + 24):
        seq[:, t] = np.asarray(mistral_jax.forward(mine, seq))[:, t - 1].argmax(-1)
    np.testing.assert_array_equal(got, seq[:, 5:])


def test_long_prompt_prefills_in_window_chunks(models_):
    theirs, mine = models_["mistral"]
    ids = prompt(40, seed=4)  # padded to 64: sixteen chunks of the window, rolling buffer of 4
    assert chunks.prefill_chunks(mine.config, 40) == (64, 4)
    np.testing.assert_array_equal(mistral_jax.generate_tokens(mine, ids, max_new_tokens=6),
                                  hf_greedy(theirs, ids, 6))


def test_the_rolling_cache_holds_a_window_however_long_the_sequence(models_):
    """README: memory O(window). Prompts of 40 and 200 tokens, 30 new tokens each: the cache
    has the window's 4 slots and the same bytes (a full cache would need 256 slots)."""
    _, mine = models_["mistral"]
    held = []
    for length in (40, 200):
        run = gen.Generation(mine, prompt(length, seed=length).tolist(), 30, Sampling(), 0)
        run.advance(30)
        held.append((run.state.cache.slots, run.state.cache.nbytes()))
    assert held[0] == held[1] and held[0][0] == mine.config.sliding_window == 4


@pytest.mark.parametrize("name", ["mistral", "gpt2"])
def test_left_padded_batch_equals_prompts_one_by_one(models_, name):
    _, mine = models_[name]
    prompts = [prompt(n, seed=n)[0] for n in (3, 9, 6)]
    width = max(map(len, prompts))
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        if i == 2:  # right padding is accepted too
            ids[i, : len(p)], mask[i, : len(p)] = p, 1
        else:
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batch = mistral_jax.generate_tokens(mine, ids, mask, max_new_tokens=12)
    for i, p in enumerate(prompts):
        alone = mistral_jax.generate_tokens(mine, p[None], max_new_tokens=12)
        np.testing.assert_array_equal(batch[i], alone[0])


def test_seeded_sampling_is_reproducible(models_):
    _, mine = models_["mistral"]
    ids = prompt(5)
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.9)
    a = mistral_jax.generate_tokens(mine, ids, seed=1, **kwargs)
    assert np.array_equal(a, mistral_jax.generate_tokens(mine, ids, seed=1, **kwargs))
    assert not np.array_equal(a, mistral_jax.generate_tokens(mine, ids, seed=2, **kwargs))


WARPERS = [(5, None), (None, 0.7), (10, 0.5), (None, 0.05), (None, None)]
LOGITS = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
DRAWS = 4000


@pytest.fixture(scope="module")
def draws():
    """{(top_k, top_p): [DRAWS, rows] seeded samples at temperature 0.7}: every case's draws
    from one jitted program (one compilation, not one per case)."""
    keys = jax.random.split(jax.random.key(0), DRAWS)
    seen = np.zeros(LOGITS.shape, bool)
    draw = jax.jit(lambda keys: [jax.vmap(lambda key, s=s: sample(LOGITS, key, seen, s))(keys)
                                 for s in (Sampling(0.7, k, p) for k, p in WARPERS)])
    return dict(zip(WARPERS, map(np.asarray, draw(keys)), strict=True))


@pytest.mark.parametrize("top_k,top_p", WARPERS)
def test_top_k_and_top_p_sample_transformers_distribution(draws, top_k, top_p):
    """4000 seeded draws per row: a token transformers' warpers drop is never drawn, and each
    token's frequency is within 5 standard errors (plus two draws, for the rarest tokens) of
    the probability transformers gives it; the total variation distance is under 0.03."""
    theirs = torch.tensor(LOGITS) / 0.7
    if top_k:
        theirs = transformers.TopKLogitsWarper(top_k)(None, theirs)
    if top_p:
        theirs = transformers.TopPLogitsWarper(top_p)(None, theirs)
    expected = torch.softmax(theirs, dim=-1).numpy().astype(np.float64)
    n, samples = DRAWS, draws[top_k, top_p]  # [n, rows]
    freq = np.stack([np.bincount(samples[:, r], minlength=50) / n for r in range(4)])
    assert not (freq[expected == 0] > 0).any()  # never a token transformers would drop
    stderr = np.sqrt(expected * (1 - expected) / n)
    kept = expected > 0
    assert (np.abs(freq - expected)[kept] <= 5 * stderr[kept] + 2 / n).all()
    assert (0.5 * np.abs(freq - expected).sum(axis=1)).max() < 0.03


def test_stops_at_eos_and_fills_with_it(models_):
    _, mine = models_["mistral"]
    ids = prompt(5)
    free = mistral_jax.generate_tokens(mine, ids, max_new_tokens=16)[0]
    eos = int(free[6])
    import dataclasses

    with_eos = mine.__class__.__new__(mine.__class__)
    with_eos.__dict__.update(mine.__dict__)
    with_eos.config = dataclasses.replace(mine.config, eos_token_id=eos)
    got = mistral_jax.generate_tokens(with_eos, ids, max_new_tokens=16)[0]
    first = free.tolist().index(eos)
    np.testing.assert_array_equal(got[: first + 1], free[: first + 1])
    assert (got[first:] == eos).all()


def compiled() -> dict:
    """How many executables generation's jitted steps hold: compilations, sharding variants
    included (a step first called with uncommitted arrays compiles again for its outputs)."""
    return {"prefill": gen._prefill._cache_size(), "decode": gen._decode._cache_size()}


def test_compilations_are_one_per_bucket(models_):
    _, mine = models_["mistral"]
    jax.clear_caches()
    for length in (5, 9, 14, 16):  # one bucket (16), prefilled in window-sized chunks: the
        mistral_jax.generate_tokens(mine, prompt(length), max_new_tokens=10)  # first (the cache
    assert compiled() == {"prefill": 2, "decode": 1}  # still empty) compiles apart from the rest
    for length in (20, 31):  # a second bucket (32); the chunks and the rolling buffer keep
        mistral_jax.generate_tokens(mine, prompt(length), max_new_tokens=10)  # their shapes
    assert compiled() == {"prefill": 2, "decode": 1}
    _, gpt2 = models_["gpt2"]
    jax.clear_caches()
    for length in (5, 9, 20, 31):  # two buckets, one cache size (whole blocks of 256 slots)
        mistral_jax.generate_tokens(gpt2, prompt(length), max_new_tokens=10)
    assert compiled() == {"prefill": 2, "decode": 1}




@pytest.mark.parametrize("spec", ["1x8", "2x4"])
@pytest.mark.parametrize("name", ["mistral", "gpt2"])
def test_sharded_model_generates_the_same_tokens(models_, name, spec):
    _, mine = models_[name]
    ids = np.concatenate([prompt(6, seed=s) for s in range(4)])
    expected = mistral_jax.generate_tokens(mine, ids, max_new_tokens=10)
    sharded = mistral_jax.shard(mine, mistral_jax.make_mesh(spec))
    assert dict(sharding.mesh_of(sharded).shape) == sharding.parse_mesh(spec)._asdict()
    np.testing.assert_array_equal(mistral_jax.generate_tokens(sharded, ids, max_new_tokens=10),
                                  expected)


def test_gpt2_refuses_more_positions_than_it_learned(models_):
    _, mine = models_["gpt2"]
    with pytest.raises(ValueError, match="=40 needs 70 positions, and this GPT-2 learned 64"):
        mistral_jax.generate_tokens(mine, prompt(30), max_new_tokens=40)


# --- text: a real tokenizer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from tests.fetch import fetch_wheel_member

    sp_model = fetch_wheel_member("mistral-common", "mistral_common/data/tokenizer.model.v1")
    src, ckpt = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("ckpt") / "c"
    hf_model("mistral", src, vocab_size=32000, **WINDOWED)
    shutil.copy(sp_model, src / "tokenizer.model")
    from convert import from_torch

    assert from_torch.main([str(src), str(ckpt)]) == 0
    return ckpt, mistral_jax.load(ckpt)


def test_text_generation_stop_strings_and_streaming(text_model):
    _, params = text_model
    text = mistral_jax.generate(params, "My favourite condiment is", max_new_tokens=24)
    ids = params.tokenizer.encode("My favourite condiment is")
    tokens = mistral_jax.generate_tokens(params, [ids], max_new_tokens=24)[0]
    # the text reads on from the prompt: the first word keeps its leading space
    assert "My favourite condiment is" + text == params.tokenizer.decode(ids + tokens.tolist())
    assert text.startswith(" ") and len(text) > 10
    assert "".join(mistral_jax.generate(params, "My favourite condiment is", max_new_tokens=24,
                                        stream=True)) == text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    assert mistral_jax.generate(params, "My favourite condiment is", max_new_tokens=24,
                                stop=[stop, "never there"]) == cut
    assert "".join(mistral_jax.generate(params, "My favourite condiment is", max_new_tokens=24,
                                        stop=stop, stream=True)) == cut
    batch = mistral_jax.generate(params, ["My favourite condiment is", "Hi"], max_new_tokens=24)
    assert batch[0] == text
    assert batch[1] == mistral_jax.generate(params, "Hi", max_new_tokens=24)


def test_stop_strings_are_looked_for_without_decoding_the_completion_again(text_model,
                                                                             monkeypatch):
    """A long completion with a stop string that never comes: each decode call reads a few
    tokens, not the whole completion so far every 16 tokens (which is quadratic)."""
    _, params = text_model
    n = 160
    whole = mistral_jax.generate(params, "My favourite condiment is", max_new_tokens=n)
    ids = params.tokenizer.encode("My favourite condiment is")
    tokens = mistral_jax.generate_tokens(params, [ids], max_new_tokens=n)[0]
    assert params.config.eos_token_id not in tokens  # the completion is n tokens long
    lengths, decode = [], params.tokenizer.decode

    def counted(ids, *args, **kwargs):
        lengths.append(len(ids))
        return decode(ids, *args, **kwargs)

    monkeypatch.setattr(params.tokenizer, "decode", counted)
    assert mistral_jax.generate(params, "My favourite condiment is", max_new_tokens=n,
                                stop="never there") == whole
    assert max(lengths) <= 16 and sum(lengths) <= 16 * n, (max(lengths), sum(lengths))


def test_chat_messages_use_the_chat_template(text_model):
    from mistral_jax.text.chat_template import encode_chat

    _, params = text_model
    messages = [{"role": "user", "content": "What is your favourite condiment?"}]
    ids = encode_chat(params.tokenizer, messages)
    assert params.tokenizer.decode(ids).startswith("[INST]")
    expected = mistral_jax.generate_tokens(params, [ids], max_new_tokens=8)[0]
    text = mistral_jax.generate(params, messages=messages, max_new_tokens=8)
    assert text == params.tokenizer.decode(expected.tolist())


def test_command_line_streams_a_completion(text_model, tmp_path):
    """As a user runs it: no XLA_FLAGS, so --mesh 1x8 makes its own 8 CPU devices; nothing on
    stderr but the note about them (no RuntimeWarning about the module)."""
    ckpt, params = text_model
    expected = mistral_jax.generate(params, "Hello", max_new_tokens=6)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "mistral_jax.generate", str(ckpt), "Hello", "--max-new-tokens",
           "6"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    once = ("building the CPU matmul kernel", "built the CPU matmul kernel")  # a fresh machine
    said = [line for line in result.stderr.splitlines() if not line.startswith(once)]
    assert result.stdout == "Hello" + expected + "\n" and said == []
    sharded = subprocess.run(cmd + ["--mesh", "1x8", "--verbose"], capture_output=True,
                             text=True, timeout=300, env=env, cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == result.stdout
    notes = [line for line in sharded.stderr.splitlines() if not line.startswith(once)]
    assert notes[0] == "note: --mesh 1x8: 8 CPU devices " \
        "(--xla_force_host_platform_device_count=8 in XLA_FLAGS)", notes
    # one-time work apart from the first token; tokens counted, not text pieces
    found = re.fullmatch(r"loaded in [\d.]+ s; one-time work ([\d.]+) s \(compiling ([\d.]+) "
                         r"s, the CPU kernel's build ([\d.]+) s\); first token ([\d.]+) s "
                         r"after the prompt, one-time work not counted; (\d+) tokens, "
                         r"[\d.]+ tokens/s after the first", notes[1])
    assert found, notes
    row = mistral_jax.generate_tokens(params, [params.tokenizer.encode("Hello")],
                                      max_new_tokens=6)[0].tolist()
    eos = params.config.eos_token_id
    assert float(found[2]) > 0 and int(found[5]) == (row.index(eos) if eos in row else 6)
    bad = subprocess.run(cmd[:4] + ["x", "--mesh", "3x3"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 1
    assert bad.stderr == ("error: --mesh 3x3: num_attention_heads=8 is not divisible by the "
                          "model axis 3; use a mesh whose T divides 8; --mesh 9x1 fits\n")


def test_bad_arguments():
    params = mistral_jax.init(mistral_jax.preset("mistral-tiny"))
    with pytest.raises(ValueError, match="has no tokenizer"):
        mistral_jax.generate(params, "hello")
    with pytest.raises(ValueError, match="temperature=-1"):
        mistral_jax.generate_tokens(params, [[1, 2]], temperature=-1)
    with pytest.raises(ValueError, match="top_p=1.5"):
        mistral_jax.generate_tokens(params, [[1, 2]], top_p=1.5)
    with pytest.raises(ValueError, match="token id 500 is outside"):
        mistral_jax.generate_tokens(params, [[1, 500]])
    with pytest.raises(ValueError, match="max_new_tokens=-1 must be >= 0"):
        mistral_jax.generate_tokens(params, [[1, 2]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        mistral_jax.generate_tokens(params, [[1, 2], [0, 0]], [[1, 1], [0, 0]])


def test_text_arguments_that_cannot_work(text_model):
    _, params = text_model
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        mistral_jax.generate(params, "Hi", stop="")
    with pytest.raises(ValueError, match="empty list"):
        mistral_jax.generate(params, [])


def test_repetition_penalty_ignores_padding(models_):
    # padding ids (0) must not count as seen: a penalty < 1 would otherwise favour token 0
    _, mine = models_["mistral"]
    ids = prompt(5, seed=7)
    assert 0 not in ids
    got = mistral_jax.generate_tokens(mine, ids, max_new_tokens=8, repetition_penalty=0.01)
    # every step the whole sequence again, held right-padded at a fixed width (that of
    # test_cached_decoding_equals_recomputing_every_step: one program serves both tests and
    # every step; position t's logits see the tokens up to t alone)
    seq = np.zeros((1, 5 + 24), ids.dtype)
    seq[:, :5] = ids
    for t in range(5, 5 + 8):
        logits = np.asarray(mistral_jax.forward(mine, seq))[:, t - 1]
        seen = np.zeros(logits.shape[-1], bool)
        seen[seq[0, :t]] = True
        logits = np.where(seen, np.where(logits > 0, logits / 0.01, logits * 0.01), logits)
        seq[:, t] = logits.argmax(-1)
    np.testing.assert_array_equal(got, seq[:, 5:5 + 8])


def test_a_stream_compiles_its_step_once(text_model):
    """One decode call per streamed token, each the first call's compilation."""
    _, params = text_model
    jax.clear_caches()
    stream = mistral_jax.generate(params, "My favourite condiment is", max_new_tokens=12,
                                  stream=True)
    text = "".join(stream)
    # the prompt's bucket (16) in two window-sized chunks: the first, over an empty cache,
    # compiles apart from the second; then one decode step for every token
    assert compiled() == {"prefill": 2, "decode": 1}
    ids = params.tokenizer.encode("My favourite condiment is")
    row = mistral_jax.generate_tokens(params, [ids], max_new_tokens=12)[0].tolist()
    eos = params.config.eos_token_id
    assert stream.tokens == (row.index(eos) if eos in row else 12) >= 2
    assert text == mistral_jax.generate(params, "My favourite condiment is", max_new_tokens=12)
