"""train/input/data.py: reading, packing, completion-only labels, document isolation, seeded and
resumable batches placed with their data-axis sharding."""

import json

import jax
import numpy as np
import pytest

import mistral_jax
from train.input import data as D

IGNORE = -100


class Chars:
    """A stand-in tokenizer: one id per character (a=1, b=2, ...), EOS 0."""

    eos_id, pad_id, bos_id, name = 0, None, None, "chars"

    def encode(self, text):
        return [ord(c) - 96 for c in text]

    encode_text = encode


def test_documents_are_packed_with_eos_between_and_the_last_row_padded():
    docs = D.tokenize([D.Document("abc"), D.Document("de")], Chars())
    rows = D.pack(docs, 4, pad_id=9, isolate_documents=False)
    assert rows.ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 9]]
    assert rows.labels.tolist() == [[1, 2, 3, 0], [4, 5, 0, IGNORE]]
    assert rows.positions.tolist() == [[0, 1, 2, 3]] * 2
    assert rows.segments.tolist() == [[0, 0, 0, 0], [1, 1, 1, -1]]


def test_prompt_and_completion_count_only_the_completion_and_its_eos():
    docs = D.tokenize([D.Document("cd", prompt="ab")], Chars())
    rows = D.pack(docs, 5, pad_id=9)
    assert rows.ids.tolist() == [[1, 2, 3, 4, 0]]
    assert rows.labels.tolist() == [[IGNORE, IGNORE, 3, 4, 0]]


def test_isolated_documents_restart_positions_and_are_not_predicted_across():
    docs = D.tokenize([D.Document("abc"), D.Document("de"), D.Document("f")], Chars())
    rows = D.pack(docs, 8, pad_id=9)  # isolated is the default: whole documents, best fit
    # a b c EOS | d e EOS | padding; then f EOS in a row of its own: no document is cut
    assert rows.segments.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1], [2, 2] + [-1] * 6]
    assert rows.positions[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert rows.labels[0].tolist() == [1, 2, 3, 0, IGNORE, 5, 0, IGNORE]
    assert rows.ids[1].tolist() == [6, 0] + [9] * 6 and rows.cut == ()


def test_reading_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one whole document\n\nwith paragraphs")
    assert D.read_documents(tmp_path / "a.txt") == [
        D.Document("one whole document\n\nwith paragraphs")]
    lines = [{"text": "t"}, {"prompt": "p", "completion": "c"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert D.read_documents(tmp_path / "b.jsonl") == [D.Document("t"),
                                                      D.Document("c", prompt="p")]


@pytest.mark.parametrize("content, message", [
    (None, "no such data file"),
    ("  \n", "the file is empty"),
    ('{"text": "ok"}\n{"prompt": "only"}\n', r"b.jsonl:2: expected a string field \"text\""),
    ('{"text": "ok"}\n\n[1, 2]\n', "b.jsonl:3: expected a JSON object"),
    ('{"text": 1}\n', r"b.jsonl:1: .*found fields \['text'\]"),
    ('{"text": "ok"\n', "b.jsonl:1: not valid JSON"),
])
def test_bad_files_say_which_file_and_line(tmp_path, content, message):
    path = tmp_path / "b.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(D.DataError, match=message):
        D.read_documents(path)


def rows_of(n_rows, seq_len=4):
    ids = np.arange(n_rows * seq_len, dtype=np.int32).reshape(n_rows, seq_len)
    return D.Rows(ids, ids.copy(), np.zeros_like(ids), np.zeros_like(ids))


def first_ids(batch):
    return np.asarray(batch["ids"])[..., 0] // 4  # row index of each [k, b] slot


def test_batches_are_shuffled_by_seed_cover_each_epoch_and_resume_from_a_position():
    mesh = mistral_jax.make_mesh("2x4")
    rows = rows_of(10)
    make = lambda seed, position=0: D.Batches(rows, batch_size=4, grad_accum=2, seed=seed,
                                              mesh=mesh, position=position)
    run = make(0)
    seen = [first_ids(next(run)) for _ in range(5)]  # 20 rows: two epochs of 10
    assert seen[0].shape == (2, 2)
    flat = np.concatenate([s.ravel() for s in seen])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert list(flat[:10]) != list(range(10)) and list(flat[:10]) != list(flat[10:])
    resumed = make(0, position=8)  # after two batches
    for expected in seen[2:]:
        np.testing.assert_array_equal(first_ids(next(resumed)), expected)
    other = make(1)
    assert [first_ids(next(other)).tolist() for _ in range(2)] != [s.tolist() for s in seen[:2]]


def test_batches_are_placed_split_over_the_data_axis():
    mesh = mistral_jax.make_mesh("2x4")
    batch = next(D.Batches(rows_of(8), batch_size=4, grad_accum=1, seed=0, mesh=mesh))
    ids = batch["ids"]
    assert ids.shape == (1, 4, 4)
    assert ids.sharding.spec == jax.sharding.PartitionSpec(None, "data", None)
    shapes = {s.data.shape for s in ids.addressable_shards}
    assert shapes == {(1, 2, 4)}  # each device holds its half of the rows


def test_batch_sizes_that_do_not_split():
    mesh = mistral_jax.make_mesh("2x4")
    with pytest.raises(D.DataError, match="not a multiple of --grad-accum 3"):
        D.Batches(rows_of(8), batch_size=4, grad_accum=3, seed=0, mesh=mesh)
    with pytest.raises(D.DataError,
                       match=r"micro-batch of 1 rows .* 2 data-parallel replicas \(D x F\)"):
        D.Batches(rows_of(8), batch_size=4, grad_accum=4, seed=0, mesh=mesh)


def test_eval_batch_pads_missing_rows_with_nothing_counted():
    mesh = mistral_jax.make_mesh("2x4")
    batch = D.eval_batch(rows_of(5), batch_size=4, max_batches=8, mesh=mesh)
    assert batch["ids"].shape == (2, 4, 4)
    labels = np.asarray(batch["labels"])
    assert (labels[1, 1:] == IGNORE).all() and (labels[0] != IGNORE).all()
    assert np.asarray(batch["ids"])[1, 0, 0] == 16  # row 4 is the fifth and last real row
