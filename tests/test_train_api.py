"""`train.api` from Python, as a notebook calls it: `finetune(...)` is `python -m
train.finetune` with the flags as keyword arguments (the same rows as the command line's run,
each handed to the callbacks as it is written), `dpo(...)` the same over train.dpo, and a bad
option or data file raises, naming the option's flag or the file's line, rather than exits."""

import json
import re

import pytest

from train import api, finetune
from train.input import default
from train.run import report

TEXT = default.CORPUS.read_text()
OPTIONS = dict(steps=3, batch_size=4, seq_len=32, lr=1e-2, warmup=1, eval_every=2, save_every=3,
               mesh="1x2")
TIMING = {"tokens_per_s", "mfu"}  # what two runs of the same steps do not share


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    (d / "train.txt").write_text(TEXT[:5000])
    entries = default.entries(TEXT[5000:8000])
    (d / "eval.jsonl").write_text("".join(json.dumps({"prompt": e[:20], "completion": e[20:]})
                                          + "\n" for e in entries))
    (d / "prefs.jsonl").write_text("".join(json.dumps({"prompt": e[:20], "chosen": " Yes.",
                                                       "rejected": " No."}) + "\n"
                                           for e in entries))
    return d


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_finetune_returns_what_the_command_line_run_writes(files, tiny_ckpt, tmp_path):
    argv = ["--init", str(tiny_ckpt), "--data", str(files / "train.txt"), "--eval-data",
            str(files / "eval.jsonl"), "--out", str(tmp_path / "cli")]
    for name, value in OPTIONS.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    assert finetune.main(argv) == 0

    steps, evals = [], []
    result = api.finetune(init=tiny_ckpt, data=files / "train.txt",
                          eval_data=[str(files / "eval.jsonl")], out=tmp_path / "api",
                          on_step=steps.append, on_eval=evals.append, **OPTIONS)
    assert result.out == tmp_path / "api" and (result.out / "final" / "weights").is_dir()
    assert result.metrics == report.read_metrics(result.out)
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [2, 3]
    assert steps + evals == sorted(result.metrics, key=lambda r: "eval_loss" in r)
    assert result.eval_loss == evals[-1]["eval_loss"]
    assert without_timing(result.metrics) == without_timing(report.read_metrics(tmp_path / "cli"))


def test_dpo_from_python(files, tiny_ckpt, tmp_path):
    rows = []
    result = api.dpo(init=str(tiny_ckpt), data=files / "prefs.jsonl",
                     eval_data=files / "prefs.jsonl", out=tmp_path / "dpo", lora_rank=2,
                     on_eval=rows.append, **{**OPTIONS, "steps": 2})
    assert [r["step"] for r in rows] == [2] and result.eval_loss == rows[0]["eval_loss"]
    assert {"rewards_margin", "accuracy"} <= set(result.metrics[0])
    assert (result.out / "adapters").is_dir()


@pytest.mark.parametrize("call, options, message", [
    (api.finetune, dict(steps=0), "steps=0 (--steps): must be positive, got 0"),
    (api.finetune, dict(remat="some"), "remat='some' (--remat): invalid choice: 'some'"),
    (api.finetune, dict(resume="yes"), "resume='yes' (--resume): must be True or False"),
    (api.finetune, dict(stepz=3), "finetune() has no option stepz=; its options are the "
     "flags of python -m train.finetune with underscores: attention, batch_size,"),
    (api.dpo, dict(loss="hinge"), "loss='hinge' (--loss): invalid choice: 'hinge'"),
    (api.dpo, dict(isolate_documents=False), "dpo() has no option isolate_documents="),
    (api.dpo, dict(data="x.jsonl"), "preference tuning needs --init CKPT"),
], ids=["positive", "choice", "bool", "unknown", "dpo choice", "dpo unknown", "dpo needs"])
def test_a_bad_option_raises_naming_its_flag(call, options, message, tmp_path):
    with pytest.raises(api.UsageError, match="^" + re.escape(message)):
        call(out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_bad_data_raises_a_data_error_naming_the_line(files, tiny_ckpt, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    with pytest.raises(api.DataError, match=re.escape(f"{tmp_path / 'bad.jsonl'}:2: ")):
        api.finetune(init=tiny_ckpt, data=tmp_path / "bad.jsonl", out=tmp_path / "out")
    with pytest.raises(api.DataError, match="same response"):
        (tmp_path / "same.jsonl").write_text('{"prompt": "a", "chosen": " b", "rejected": " b"}')
        api.dpo(init=tiny_ckpt, data=tmp_path / "same.jsonl", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
