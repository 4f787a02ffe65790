"""`python -m train.dpo` on a tiny Mistral: its loss, rewards and accuracy are TRL's DPOTrainer's
(1.16) on the same pairs, policy and reference, for DPO's sigmoid loss and IPO, with full tuning
and with LoRA; a run learns a separable preference, resumes with the same losses without
computing its reference again, and refuses bad input in one line."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import mistral_jax
from mistral_jax.base import trees
from mistral_jax.text.tokenizer import Tokenizer
from train import dpo
from train.compute import preference as P
from train.compute import step as S
from train.input import default, prefs
from train.run import flags, loop, report
from train.run.preference import REFERENCE_FILE, Preference

ROOT = Path(__file__).resolve().parents[1]
BETA = 0.1
ENTRIES = default.entries(default.CORPUS.read_text())[20:80]
# the training set is separable: every chosen response says yes, every rejected one no
TRAIN = [{"prompt": e[:25], "chosen": " Yes, indeed.", "rejected": " No, never."}
         for e in ENTRIES[:24]]
# the held-out pairs, compared with TRL: responses of every length, strings and chat messages
TEXT_EVAL = [{"prompt": e[:20], "chosen": " " + e[20:50].strip(),
              "rejected": " " + o[30:45].strip()} for e, o in zip(ENTRIES[24:32], ENTRIES[40:48],
                                                                strict=True)]
CHAT_EVAL = [{"prompt": [{"role": "system", "content": "Define."},
                         {"role": "user", "content": e[:15]}],
              "chosen": {"role": "assistant", "content": e[15:40]},
              "rejected": [{"role": "assistant", "content": o[:12]}]}
             for e, o in zip(ENTRIES[32:36], ENTRIES[48:52], strict=True)]
ROW_KEYS = {"step", "loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "accuracy",
            "tokens_per_s", "lr", "grad_norm", "mfu"}


def losses(out) -> tuple[dict, dict]:
    """{step: loss} and {step: eval_loss} of OUT/metrics.jsonl."""
    rows = report.read_metrics(Path(out))
    return ({r["step"]: r["loss"] for r in rows if "loss" in r},
            {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r})


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    jsonl(d / "prefs.jsonl", TRAIN)
    jsonl(d / "eval.jsonl", TEXT_EVAL + CHAT_EVAL)
    return d


FULL = ("--mesh", "2x2", "--grad-accum", "2")


def flags_of(files, ckpt, out, *extra):
    return ["--init", str(ckpt), "--data", str(files / "prefs.jsonl"), "--eval-data",
            str(files / "eval.jsonl"), "--out", str(out), "--steps", "4", "--batch-size", "4",
            "--lr", "1e-3", "--warmup", "1", "--eval-every", "2", "--save-every", "2", *extra]


@pytest.fixture(scope="module")
def full(files, tiny_ckpt):
    """Full tuning, sigmoid loss, on a 2x2 mesh, 2 micro-batches a step, in this process."""
    out = files / "full"
    assert dpo.main(flags_of(files, tiny_ckpt, out, *FULL)) == 0
    return out


@pytest.fixture(scope="module")
def adapted(files, tiny_ckpt):
    """LoRA, IPO, as a user types it."""
    out = files / "lora"
    argv = flags_of(files, tiny_ckpt, out, "--lora-rank", "4", "--loss", "ipo", "--lr", "1e-2")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user's shell
    proc = subprocess.run([sys.executable, "-m", "train.dpo", *argv], cwd=ROOT, timeout=600,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4: eval loss" in proc.stderr and "accuracy" in proc.stderr
    return out


def eval_pairs(files, tiny_ckpt) -> list[prefs.Pair]:
    """The held-out pairs as our runs read them."""
    return prefs.read_pairs(files / "eval.jsonl", Tokenizer.from_dir(tiny_ckpt))


def ours(policy, reference, pairs, kind) -> dict:
    """Our eval row for `pairs` under two loaded models, through full tuning's path: the
    reference's log-probabilities computed first, then the eval step's loss."""
    mesh = mistral_jax.make_mesh("1x1")
    rows, _ = prefs.rows(pairs, 1024, pad_id=1)
    step = P.make_reference_step(reference, mesh, dtype=jnp.float32)
    logps = [np.asarray(step(trees.weights(reference), b)).reshape(-1, 2)
             for b in prefs.in_order(rows, batch_size=len(rows), grad_accum=1, mesh=mesh)]
    batch = prefs.eval_batch(rows.with_reference(np.concatenate(logps)[:len(rows)]),
                             batch_size=len(rows), max_batches=1, mesh=mesh)
    loss = P.preference_loss(policy, dtype=jnp.float32, assemble=lambda p, f: p, base=None,
                             beta=BETA, kind=kind)
    return Preference().report(*S.make_eval_step(loss)(trees.weights(policy), {}, batch))[0]


def trainer(policy, reference, kind, tokenizer_dir, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # float32 on both sides: DPOConfig's bf16 defaults to on, and on a CPU accelerate then
    # runs both models under bfloat16 autocast (their log-probabilities 0.03 off)
    config = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=[kind],
                       report_to=[], use_cpu=True, bf16=False)
    return DPOTrainer(model=policy, ref_model=reference, args=config,
                      train_dataset=Dataset.from_list(TEXT_EVAL),
                      processing_class=transformers.AutoTokenizer.from_pretrained(tokenizer_dir))


def theirs(policy, reference, pairs, kind, tokenizer_dir, tmp_path) -> dict:
    """TRL's loss and logged rewards for `pairs`, from its collator and compute_loss."""
    dpo_trainer = trainer(policy, reference, kind, tokenizer_dir, tmp_path)
    batch = dpo_trainer.data_collator([{"prompt_ids": list(p.prompt),
                                        "chosen_ids": list(p.chosen),
                                        "rejected_ids": list(p.rejected)} for p in pairs])
    dpo_trainer.model.eval()
    with torch.no_grad():
        loss = dpo_trainer.compute_loss(dpo_trainer.model, batch)
    logged = {k: v[-1] for k, v in dpo_trainer._metrics["eval"].items()}
    return {"eval_loss": float(loss), "eval_rewards_chosen": logged["rewards/chosen"],
            "eval_rewards_rejected": logged["rewards/rejected"],
            "eval_rewards_margin": logged["rewards/margins"],
            "eval_accuracy": logged["rewards/accuracies"]}


def assert_close(got: dict, expected: dict, atol=1e-5) -> str:
    """Each value within `atol`; what the differences were, for the log (pytest -s)."""
    assert sorted(got) == sorted(expected)
    assert max(abs(got[k] - expected[k]) for k in got) <= atol, \
        {k: (got[k], expected[k]) for k in got}
    return ", ".join(f"{k} {got[k]:.6g} ({abs(got[k] - expected[k]):.1e})" for k in got)


def hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_pairs_are_tokenized_as_trl_tokenizes_them(files, tiny_hf, tiny_ckpt, tmp_path):
    """Chat pairs through the checkpoint's template, split where TRL splits them; string pairs
    (prompts ending where a word may, responses starting with a space) as TRL's too."""
    from datasets import Dataset

    dpo_trainer = trainer(hf(tiny_hf), hf(tiny_hf), "sigmoid", tiny_hf, tmp_path)
    as_list = lambda m: m if isinstance(m, list) else [m]  # TRL takes a list of messages
    expected = []
    for part in (TEXT_EVAL, [{**r, "chosen": as_list(r["chosen"]),
                              "rejected": as_list(r["rejected"])} for r in CHAT_EVAL]):
        prepared = dpo_trainer._prepare_dataset(Dataset.from_list(part),
                                                dpo_trainer.processing_class,
                                                dpo_trainer.args, "held-out")
        expected += [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in prepared]
    got = [(list(p.prompt), list(p.chosen), list(p.rejected))
           for p in eval_pairs(files, tiny_ckpt)]
    assert got == expected


def test_full_tuning_writes_rows_and_learns_the_separable_preference(full):
    rows = report.read_metrics(full)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and set(train[0]) == ROW_KEYS
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # the policy is the reference
    assert train[-1]["loss"] < train[0]["loss"] - 0.1 and train[-1]["accuracy"] == 1.0
    assert train[-1]["rewards_margin"] > 0.5
    assert all(r["rewards_margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"],
                                                    abs=1e-5) for r in train)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert set(evals[0]) == {"step", *(f"eval_{k}" for k in ("loss", *P.METRICS))}
    assert (full / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (full / REFERENCE_FILE).is_file() and (full / "final" / "weights").is_dir()
    assert json.loads((full / "run.json").read_text())["beta"] == BETA


@pytest.mark.parametrize("kind", P.LOSSES)
def test_full_tuning_loss_is_trls(files, full, tiny_hf, tiny_ckpt, kind, tmp_path):
    """The tuned policy against --init as the reference: the run's own eval row (sigmoid) and
    our eval path (IPO) equal TRL's loss, rewards and accuracy on the same pairs."""
    from convert import to_torch

    assert to_torch.main([str(full / "final"), str(tmp_path / "policy")]) == 0
    expected = theirs(hf(tmp_path / "policy"), hf(tiny_hf), eval_pairs(files, tiny_ckpt), kind,
                      tiny_hf, tmp_path)
    got = ours(mistral_jax.load(full / "final"), mistral_jax.load(tiny_ckpt),
               eval_pairs(files, tiny_ckpt), kind)
    print(f"full tuning, {kind}: ours (|ours - TRL|): {assert_close(got, expected)}")
    if kind == "sigmoid":  # what the run itself logged at its last step
        logged = [r for r in report.read_metrics(full) if "eval_loss" in r][-1]
        print(f"  the run's own eval row: {assert_close({k: logged[k] for k in got}, expected)}")


@pytest.mark.parametrize("kind", P.LOSSES)
def test_lora_loss_is_trls_with_the_base_as_reference(files, adapted, tiny_hf, tiny_ckpt,
                                                      kind, tmp_path):
    """PEFT's model of our exported adapters against the base: the run's eval row (IPO, the
    reference being the base run inside the step) and our eval path (sigmoid) equal TRL's."""
    import peft

    from convert import to_torch

    assert not (adapted / REFERENCE_FILE).exists()  # LoRA's reference is the base, run live
    assert to_torch.main([str(adapted / "adapters"), str(tmp_path / "peft")]) == 0
    policy = peft.PeftModel.from_pretrained(hf(tiny_hf), tmp_path / "peft").eval()
    expected = theirs(policy, hf(tiny_hf), eval_pairs(files, tiny_ckpt), kind, tiny_hf, tmp_path)
    got = ours(mistral_jax.load(tiny_ckpt, adapters=adapted / "adapters"),
               mistral_jax.load(tiny_ckpt), eval_pairs(files, tiny_ckpt), kind)
    print(f"LoRA, {kind}: ours (|ours - TRL|): {assert_close(got, expected)}")
    if kind == "ipo":
        logged = [r for r in report.read_metrics(adapted) if "eval_loss" in r][-1]
        print(f"  the run's own eval row: {assert_close({k: logged[k] for k in got}, expected)}")
    train = [r for r in report.read_metrics(adapted) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and set(train[0]) == ROW_KEYS


def test_resume_gives_the_same_losses_without_computing_the_reference_again(
        files, tiny_ckpt, full, monkeypatch, capsys):
    out, calls = files / "interrupted", []
    real_next = prefs.PairBatches.__next__

    def stop_after_two(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(prefs.PairBatches, "__next__", stop_after_two)
    argv = flags_of(files, tiny_ckpt, out, *FULL)
    assert dpo.main(argv) == 130
    monkeypatch.undo()
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-2].startswith("interrupted at step 2; the last checkpoint is step 2")
    resume = shlex.split(said[-1])
    assert resume[:3] == ["python", "-m", "train.dpo"] and resume[3:] == argv + ["--resume"]

    def refuse(*args, **kwargs):
        raise AssertionError("the resumed run computed the reference again")

    monkeypatch.setattr(P, "make_reference_step", refuse)
    assert dpo.main(resume[3:]) == 0
    assert losses(out) == losses(full)  # bit for bit
    rows = report.read_metrics(out)
    assert [r["accuracy"] for r in rows if "loss" in r] == \
        [r["accuracy"] for r in report.read_metrics(full) if "loss" in r]


def test_a_long_pair_keeps_the_end_of_its_prompt_and_one_warning_counts_them(files,
                                                                            tiny_ckpt):
    pair = prefs.Pair(tuple(range(10, 20)), (1, 2, 3), (4, 5))
    assert prefs.fit(pair, 6) == prefs.Pair((17, 18, 19), (1, 2, 3), (4, 5))
    assert prefs.fit(prefs.Pair((7, 8), (1,) * 9, (2,)), 5) == prefs.Pair((8,), (1,) * 4, (2,))
    assert prefs.fit(pair, 13) == pair
    rows, cut = prefs.rows([pair, prefs.Pair((9,), (1,), (2,))], 6, pad_id=0)
    assert cut == 1 and rows.ids.shape == (2, 2, 6)
    np.testing.assert_array_equal(rows.labels[0, 1], [-100, -100, -100, 4, 5, -100])

    argv = flags_of(files, tiny_ckpt, files / "never-written", "--seq-len", "12")
    args = flags.with_defaults(dpo.parser().parse_args(argv), "dpo")
    setup = loop.set_up(args, Preference())
    warnings = [m for m in setup.messages if m.startswith("warning:")]
    assert len(warnings) == 2 and warnings[0].startswith(
        "warning: 24 of 24 training pairs are longer than --seq-len 12")
    assert setup.rows.ids.shape[-1] == 12 and not (files / "never-written").exists()


RAISING = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System messages are "
           "not supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
BAD = [
    ({"prompt": "a", "chosen": " b"}, 1, 'missing "rejected"'),
    ({"prompt": "a", "chosen": " b", "rejected": " b"}, 1, '"chosen" and "rejected" are the '
     "same response"),
    ({"prompt": [{"role": "narrator", "content": "x"}], "chosen": {"role": "assistant",
      "content": "y"}, "rejected": {"role": "assistant", "content": "z"}}, 1,
     "prompt\\[0\\] has the unknown role 'narrator'"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": {"role": "user", "content": "y"},
      "rejected": {"role": "assistant", "content": "z"}}, 1, '"chosen" must be one assistant'),
    ({"prompt": "a", "chosen": {"role": "assistant", "content": "y"}, "rejected": " z"}, 1,
     '"chosen" must be a string, as "prompt" is'),
    ("not json", 2, "not valid JSON"),
    ({"prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": "q"}],
      "chosen": {"role": "assistant", "content": "y"}, "rejected": {"role": "assistant",
      "content": "z"}}, 1, "the chat template cannot render this conversation: System "
     "messages are not supported"),
]


@pytest.mark.parametrize("line, number, message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_pairs_are_one_line_naming_the_file_and_line(files, tiny_ckpt, tmp_path, line,
                                                         number, message, capsys):
    good = json.dumps(TRAIN[0])
    text = [json.dumps(line)] if number == 1 else [good, line]
    (tmp_path / "bad.jsonl").write_text("\n".join(text) + "\n")
    ckpt = tiny_ckpt
    if "template" in message:
        ckpt = tmp_path / "raising"
        shutil.copytree(tiny_ckpt, ckpt)
        config = json.loads((ckpt / "tokenizer_config.json").read_text())
        (ckpt / "tokenizer_config.json").write_text(json.dumps({**config,
                                                                "chat_template": RAISING}))
    argv = flags_of(files, ckpt, tmp_path / "out")
    argv[argv.index("--data") + 1] = str(tmp_path / "bad.jsonl")
    assert dpo.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {tmp_path / 'bad.jsonl'}:{number}: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_without_init_or_data_the_command_says_what_it_needs(tmp_path, capsys):
    assert dpo.main(["--data", "x.jsonl", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("error: preference tuning needs --init CKPT (the model "
                                       "to tune, and its reference) and --data PAIRS.jsonl\n")
    assert not (tmp_path / "out").exists()
