"""Packing (train/input/packing.py) and the chat data around it (train/input/chat.py): rows of
whole documents packed best-fit decreasing, conversations cut at user turns, {% generation %}
marks, and the reading of {"messages"} lines."""

import json

import numpy as np
import pytest

from mistral_jax.text.chat_template import render, render_spans
from mistral_jax.text.tokenizer import Tokenizer
from tests.fetch import byte_level_bpe
from train.input import chat
from train.input import data as D
from train.input.packing import Tokens, best_fit_decreasing, cut_points, pack

IGNORE = -100


def documents(lengths, seed=0):
    """Tokens of the given lengths, ids unique across all of them (so each can be found)."""
    rng = np.random.default_rng(seed)
    out, start = [], 1
    for n in lengths:
        out.append(Tokens(np.arange(start, start + n, dtype=np.int32), rng.random(n) < 0.7))
        start += n
    return out


def first_fit(lengths, capacity):
    """Rows opened as needed, each document into the first that has room, in reading order."""
    rooms = []
    for n in lengths:
        for i, room in enumerate(rooms):
            if room >= n:
                rooms[i] -= n
                break
        else:
            rooms.append(capacity - n)
    return len(rooms)


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_keeps_documents_whole_and_pads_no_more_than_first_fit(seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.choice([16, 64, 256]))
    lengths = rng.integers(1, 2 * seq_len, rng.integers(5, 300)).tolist()
    docs = documents(lengths, seed)
    rows = pack(docs, seq_len, pad_id=0)
    assert rows.ids.shape[1] == seq_len  # never longer than a row
    where = {int(t): (r, c) for r, row in enumerate(rows.ids) for c, t in enumerate(row) if t}
    tokens = np.concatenate([d.ids for d in docs])
    assert len(where) == len(tokens) == int((rows.segments >= 0).sum())  # each token once
    for i, doc in enumerate(docs):
        places = [where[int(t)] for t in doc.ids]
        if len(doc.ids) <= seq_len:  # whole, in one row, in order
            assert len({r for r, _ in places}) == 1
            assert [c for _, c in places] == list(range(places[0][1], places[0][1] + len(places)))
            assert i not in rows.cut
        else:
            assert i in rows.cut
            assert len({r for r, _ in places}) == -(-len(doc.ids) // seq_len)
        r, c = places[0]
        # a row's first label is never predicted (nothing comes before it); others are masked
        assert rows.positions[r, c] == 0 and (c == 0 or rows.labels[r, c] == IGNORE)
        counted = [rows.labels[r, c] != IGNORE for r, c in places[1:]]
        assert counted == doc.counted[1:].tolist() or len(doc.ids) > seq_len
    pieces = [b - a for d in docs for a, b in cut_points(d, seq_len)]
    assert len(rows) <= first_fit(pieces, seq_len)
    assert len(rows) >= -(-sum(pieces) // seq_len)
    again = pack(documents(lengths, seed), seq_len, pad_id=0)
    assert again.fingerprint == rows.fingerprint and (again.segments == rows.segments).all()


def test_best_fit_places_each_in_the_fullest_row_that_fits():
    # 7 opens row 0 (room 3), 6 row 1 (room 4), 5 row 2 (room 5); 4 goes to row 1, the
    # fullest that holds it; 3 to row 0; 2 to row 2 (room 5, the only one left that fits)
    assert best_fit_decreasing([3, 7, 2, 6, 5, 4], 10) == [[0, 1], [3, 5], [2, 4]]
    assert best_fit_decreasing([], 10) == []
    with pytest.raises(ValueError, match="1..10"):
        best_fit_decreasing([11], 10)


def test_stream_packing_without_isolation_is_unchanged():
    docs = documents([5, 3, 6])
    rows = pack(docs, 4, pad_id=0, isolate_documents=False)
    assert rows.ids.ravel()[:14].tolist() == list(range(1, 15))
    assert rows.positions.tolist() == [[0, 1, 2, 3]] * 4
    assert rows.cut == (0, 2)  # the first runs on into row 1, the third into row 3
    assert abs(rows.padding_share - 2 / 16) < 1e-9


def test_a_long_conversation_is_cut_where_user_turns_start():
    doc = Tokens(np.arange(1, 31, dtype=np.int32), np.ones(30, bool), turns=(6, 12, 25))
    # each piece the longest that ends where a turn starts; no turn starts in 13..22, so that
    # piece is cut at 10 tokens; the last 8 fit a row
    assert cut_points(doc, 10) == [(0, 6), (6, 12), (12, 22), (22, 30)]
    assert cut_points(doc, 30) == [(0, 30)]
    rows = pack([doc], 10, pad_id=0)
    assert rows.cut == (0,) and np.unique(rows.segments[rows.segments >= 0]).tolist() == [
        0, 1, 2, 3]


# --- conversations ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    bpe = byte_level_bpe(["hello there, how are you", "user assistant system"] * 20, 300,
                         ["<|im_start|>", "<|im_end|>"])
    path = tmp_path_factory.mktemp("chatml")
    bpe.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == "
                "'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
                "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": template}))
    return Tokenizer.from_dir(path)


def say(role, content):
    return {"role": role, "content": content}


def test_generation_marks_give_spans_and_never_reach_the_text(chatml):
    messages = [say("user", "hello"), say("assistant", "how are you")]
    text, spans = render_spans(chatml, messages, add_generation_prompt=False)
    assert text == render(chatml, messages, add_generation_prompt=False) == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhow are you<|im_end|>\n")
    assert [text[a:b] for a, b in spans] == ["how are you<|im_end|>"]
    with pytest.raises(ValueError, match="U\\+FDD0 or U\\+FDD1"):
        render_spans(chatml, [say("user", "hello\ufdd0")])


def test_user_turns_are_the_places_to_cut(chatml):
    messages = [say("system", "there"), say("user", "hello"), say("assistant", "how are you"),
                say("user", "there"), say("assistant", "hello")]
    tokens = chat.encode(chatml, messages)
    starts = [chatml.id_to_piece(int(tokens.ids[t])) for t in tokens.turns]
    assert starts == ["<|im_start|>", "<|im_start|>"] and len(tokens.turns) == 2
    counted = chatml.decode(tokens.ids[tokens.counted].tolist(), skip_special_tokens=False)
    assert counted == "how are you<|im_end|>hello<|im_end|>"
    everything = chat.encode(chatml, messages, loss_on="all")
    assert everything.counted.all() and everything.turns == tokens.turns


def test_reading_messages_lines(tmp_path):
    path = tmp_path / "chat.jsonl"
    conversation = [say("user", "hi"), say("assistant", "hello")]
    path.write_text(json.dumps({"messages": conversation}) + "\n" + json.dumps({"text": "t"}))
    docs = D.read_documents(path)
    assert docs == [D.Document(messages=tuple(conversation)), D.Document("t")]
    assert [d.where for d in docs] == [f"{path}:1", f"{path}:2"]


def test_a_tokenizer_without_a_template_says_where_to_add_one(chatml, tmp_path):
    bare = Tokenizer.from_file(chatml.save(tmp_path)[0], config=b'{"eos_token": "<|im_end|>"}')
    assert bare.chat_template is None
    doc = D.Document(messages=(say("user", "hi"), say("assistant", "hello")), where="c.jsonl:3")
    with pytest.raises(D.DataError, match="^c.jsonl:3: the checkpoint's tokenizer has no chat "
                       "template .* tokenizer_config.json"):
        D.tokenize([doc], bare)
