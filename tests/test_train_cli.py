"""`python -m train.finetune` end to end on a tiny checkpoint: resume gives the same losses as an
uninterrupted run, so does a run SIGKILLed in the middle of a save, so do 2 processes x 4
devices; the default run writes what generate loads; bad input fails in one line."""

import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mistral_jax
from mistral_jax.arch import configs
from mistral_jax.text.tokenizer import Tokenizer
from tests.fetch import byte_level_bpe
from tests.reference import hf_model
from train import finetune
from train.input import default
from train.run import report
from train.run.checkpoints import RunCheckpoints, saved_steps

ROOT = Path(__file__).resolve().parents[1]
TEXT = default.CORPUS.read_text()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 8-head Mistral checkpoint with a BPE of 300 pieces, and train / eval text."""
    d = tmp_path_factory.mktemp("finetune")
    bpe = byte_level_bpe(default.entries(TEXT[:60000]), 300, ["<s>", "</s>"])
    tokenizer = Tokenizer(bpe.to_str().encode(), "hf", "test-bpe")
    config = configs.MistralConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=4,
                                   sliding_window=None, max_position_embeddings=128,
                                   bos_token_id=0, eos_token_id=1)
    mistral_jax.save(mistral_jax.init(config, seed=0, tokenizer=tokenizer), d / "ckpt")
    (d / "train.txt").write_text(TEXT[:6000])
    (d / "eval.jsonl").write_text("\n".join(json.dumps({"prompt": e[:20], "completion": e[20:]})
                                            for e in default.entries(TEXT[6000:9000])))
    return d


def flags(files, out, *extra):
    return ["--mesh", "2x4", "--init", str(files / "ckpt"), "--data", str(files / "train.txt"),
            "--eval-data", str(files / "eval.jsonl"), "--out", str(out), "--steps", "6",
            "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2", "--warmup", "1",
            "--save-every", "3", "--eval-every", "3", *extra]


def losses(out):
    """{step: loss} and {step: eval_loss}; a resumed run's rows replace the earlier ones. Each
    run's MFU is checked on the way (`assert_mfu_is_a_fraction`)."""
    rows = report.read_metrics(Path(out))
    assert_mfu_is_a_fraction(rows)
    return ({r["step"]: r["loss"] for r in rows if "loss" in r},
            {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r})


def assert_mfu_is_a_fraction(rows):
    """Every training row has an MFU above 0 and below 1 (train/compute/flops.py: model FLOPs over
    the measured peak of the run's own devices)."""
    mfu = [r["mfu"] for r in rows if "loss" in r]
    assert mfu and all(0 < m < 1 for m in mfu), mfu


def assert_same_losses(got, expected):
    """Bit for bit, as README says: the float32 losses themselves, not within a tolerance."""
    for g, e in zip(got, expected, strict=True):
        assert sorted(g) == sorted(e)
        assert [g[s] for s in sorted(g)] == [e[s] for s in sorted(e)]


@pytest.fixture(scope="module")
def uninterrupted(files):
    out = files / "uninterrupted"
    assert finetune.main(flags(files, out)) == 0
    return losses(out)


def test_uninterrupted_run_learns_and_writes_everything(files, uninterrupted):
    train, evals = uninterrupted
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and sorted(evals) == [3, 6]
    assert train[6] < train[1] and evals[6] < evals[3]
    out = files / "uninterrupted"
    row = report.read_metrics(out)[0]
    assert set(row) == {"step", "loss", "tokens_per_s", "lr", "grad_norm", "mfu"}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert RunCheckpoints(out, 3).latest() == 6
    model = mistral_jax.load(out / "final")
    assert model.config.vocab_size == model.tokenizer.vocab_size == 300
    assert model.tokenizer.encode(TEXT[:300]) == Tokenizer.from_dir(files / "ckpt").encode(
        TEXT[:300])  # the run's tokenizer, carried into final/


def test_eval_gives_the_numbers_the_run_printed(files, uninterrupted, capsys):
    from train import eval as eval_cli

    out = files / "uninterrupted"
    assert eval_cli.main([str(out / "final"), "--data", str(files / "eval.jsonl"), "--seq-len",
                          "32", "--batch-size", "8", "--mesh", "2x4"]) == 0
    printed = capsys.readouterr().out
    assert re.fullmatch(rf"loss {uninterrupted[1][6]:.4f}, perplexity "
                        rf"{np.exp(uninterrupted[1][6]):.2f}, [1-9][\d,]* tokens\n", printed), \
        printed


def test_eval_of_a_runs_output_takes_the_runs_settings(files, uninterrupted, lora_run, capsys):
    """No --seq-len: train.eval on a run's final/, and on the base with its adapters/, packs
    the data as the run did (32 tokens a row, not 256) and gives the run's eval loss; a flag
    given still wins."""
    from train import eval as eval_cli

    def evaluate(*argv, mesh="2x4"):
        assert eval_cli.main([*argv, "--data", str(files / "eval.jsonl"), "--mesh", mesh]) == 0
        printed = capsys.readouterr()
        return float(printed.out.split(",")[0].removeprefix("loss ")), printed.err

    full = files / "uninterrupted"
    loss, said = evaluate(str(full / "final"))
    assert f"{loss:.4f}" == f"{uninterrupted[1][6]:.4f}"
    assert "--seq-len 32, --dtype float32, --isolate-documents, --loss-on assistant: as the " \
        f"run in {full} trained" in said
    assert evaluate(str(full / "final"), "--seq-len", "256")[0] != pytest.approx(loss, abs=1e-3)

    # the LoRA run (bfloat16, on 1x8: evaluated on the run's mesh, as the float run on its own)
    lora = lora_run
    run_eval = losses(lora)[1][3]
    loss, said = evaluate(str(files / "ckpt"), "--adapters", str(lora / "adapters"), mesh="1x8")
    assert f"{loss:.4f}" == f"{run_eval:.4f}"
    assert "--seq-len 32, --dtype bfloat16" in said
    assert evaluate(str(files / "ckpt"), "--adapters", str(lora / "adapters"), "--seq-len",
                    "256", mesh="1x8")[0] != pytest.approx(loss, abs=1e-3)
    assert eval_cli.main([str(lora / "adapters"), "--data", str(files / "eval.jsonl")]) == 1
    assert capsys.readouterr().err == (
        f"error: {lora / 'adapters'} holds LoRA adapters, not a checkpoint: evaluate them on "
        f"their base, python -m train.eval {files / 'ckpt'} --adapters {lora / 'adapters'} ...\n")
    # a checkpoint outside any run: the defaults, and nothing said about a run
    assert "as the run" not in evaluate(str(files / "ckpt"), "--seq-len", "32")[1]


def test_resume_continues_with_the_same_losses(files, uninterrupted, monkeypatch, capsys):
    """Ctrl-C after step 3: the run says where its last checkpoint is and the command that
    resumes it; that command gives the uninterrupted run's losses."""
    from train.input import data

    out, calls = files / "interrupted", []
    real_next = data.Batches.__next__

    def stop_after_three(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(data.Batches, "__next__", stop_after_three)
    assert finetune.main(flags(files, out)) == 130
    monkeypatch.undo()
    assert sorted(losses(out)[0]) == [1, 2, 3]
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-2] == (f"interrupted at step 3; the last checkpoint is step 3 in "
                        f"{out / 'checkpoints'}; continue with:")
    resume = shlex.split(said[-1])
    assert resume[:3] == ["python", "-m", "train.finetune"]
    assert resume[3:] == flags(files, out, "--resume")
    assert finetune.main(resume[3:]) == 0
    assert_same_losses(losses(out), uninterrupted)


KILL_IN_COMMIT = textwrap.dedent("""
    import os, signal, sys
    from orbax.checkpoint._src.checkpointers import async_checkpointer
    commit = async_checkpointer._on_commit_callback
    def kill_before_committing_step_4(tmp_dir, *args, **kwargs):
        if tmp_dir.get_final().name == "4":  # every file written, the rename not yet done
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(tmp_dir, *args, **kwargs)
    async_checkpointer._on_commit_callback = kill_before_committing_step_4
    from train.finetune import main
    sys.exit(main(sys.argv[1:]))
""")


def subprocess_env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI sets it
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_killed_in_the_middle_of_a_save_resumes_from_the_last_complete_checkpoint(
        files, uninterrupted):
    out = files / "killed"
    argv = flags(files, out, "--save-every", "2")
    proc = subprocess.run([sys.executable, "-c", KILL_IN_COMMIT, *argv], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "2" in names and "4" not in names
    assert any(n.startswith("4.") and "tmp" in n for n in names)  # the half-made save
    assert RunCheckpoints(out, 3).latest() == 2
    assert finetune.main(argv + ["--resume"]) == 0
    assert_same_losses(losses(out), uninterrupted)
    assert not any("tmp" in p.name for p in (out / "checkpoints").iterdir())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_flags(files, out):
    """1x4x2: 4-way FSDP, 2-way tensor parallel (over 2 processes, each holds 2 fsdp shards)."""
    return [*flags(files, out), "--mesh", "1x4x2"]  # the last --mesh counts


@pytest.fixture(scope="module")
def fsdp_run(files):
    assert finetune.main(fsdp_flags(files, files / "fsdp")) == 0
    return losses(files / "fsdp")


def test_fsdp_run_equals_the_data_and_tensor_parallel_one(fsdp_run, uninterrupted):
    """The same run on 1x4x2 (weights and optimizer state in 4 fsdp shards) as on 2x4: the
    same losses, up to the order XLA adds the gradients in."""
    (train, evals), (train_2x4, evals_2x4) = fsdp_run, uninterrupted
    assert sorted(train) == sorted(train_2x4) and sorted(evals) == sorted(evals_2x4)
    np.testing.assert_allclose([train[s] for s in sorted(train)],
                               [train_2x4[s] for s in sorted(train)], rtol=1e-5, atol=0)
    np.testing.assert_allclose([evals[s] for s in sorted(evals)],
                               [evals_2x4[s] for s in sorted(evals)], rtol=1e-5, atol=0)


def test_two_processes_of_four_devices_equal_one_process_of_eight(files, fsdp_run):
    """1x4x2 over two processes (`jax.distributed`, gloo) against the same mesh in one: each
    process reads only the rows its devices hold, and the fsdp axis crosses the processes."""
    out = files / "two-processes"
    common = fsdp_flags(files, out) + ["--num-processes", "2",
                                       "--coordinator", f"127.0.0.1:{free_port()}"]
    procs = [subprocess.Popen([sys.executable, "-m", "train.finetune", *common,
                               "--process-id", str(i)], env=subprocess_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "note: --mesh 1x4x2: 8 CPU devices" in outputs[0]
    assert "note:" not in outputs[1]  # only process 0 speaks for the run
    (train, evals), (train_alone, evals_alone) = losses(out), fsdp_run
    # To float32 rounding: gloo adds the fsdp gradients across processes in another order. On
    # a 2-core EPYC, 2 of 6 steps were 1-2 ULPs apart; on 2x4 (data across processes) the
    # training losses were bit for bit.
    for got, alone in ((train, train_alone), (evals, evals_alone)):
        assert sorted(got) == sorted(alone)
        np.testing.assert_allclose([got[s] for s in sorted(got)],
                                   [alone[s] for s in sorted(got)], rtol=1e-6, atol=0)
    assert mistral_jax.load(out / "final").config.vocab_size == 300


@pytest.fixture(scope="module")
def lora_run(files):
    """A LoRA run in bfloat16 with the other options of the step, end to end: its adapters are
    merged (test_lora_...) and evaluated on their base (test_eval_of_a_runs_output_...)."""
    out = files / "lora"
    argv = flags(files, out, "--lora-rank", "2", "--lora-targets", "q,v,down", "--merge-lora",
                 "--steps", "3", "--mesh", "1x8", "--isolate-documents", "--dtype", "bfloat16",
                 "--grad-accum", "2", "--remat", "full", "--unroll", "all")
    assert finetune.main(argv) == 0
    return out


def test_lora_trains_adapters_and_merges_into_a_plain_checkpoint(files, lora_run):
    out = lora_run
    train, evals = losses(out)
    assert sorted(train) == [1, 2, 3] and all(np.isfinite(list(train.values())))
    adapters = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert adapters["rank"] == 2 and adapters["targets"] == ["q", "v", "down"]
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        saved = c.metadata(out / "checkpoints" / "3" / "state").item_metadata.tree
    assert sorted(saved["params"]["layers"]) == ["down", "q", "v"]  # only the adapters
    base, merged = mistral_jax.load(files / "ckpt"), mistral_jax.load(out / "final")
    assert not np.allclose(merged.layers.q[...], base.layers.q[...])
    np.testing.assert_array_equal(merged.layers.k[...], base.layers.k[...])
    adapted = mistral_jax.load(files / "ckpt", adapters=out / "adapters")  # what --merge-lora did
    for name in ("q", "v", "down"):
        np.testing.assert_allclose(getattr(adapted.layers, name)[...],
                                   getattr(merged.layers, name)[...], atol=1e-6)


def test_non_finite_steps_are_skipped_then_the_run_stops(files, tmp_path, capsys):
    model = mistral_jax.load(files / "ckpt")
    model.norm[...] = model.norm[...].at[0].set(np.nan)
    mistral_jax.save(model, tmp_path / "nan")
    argv = flags(files, tmp_path / "out", "--max-bad-steps", "2")
    argv[argv.index("--init") + 1] = str(tmp_path / "nan")
    assert finetune.main(argv) == 3
    err = capsys.readouterr().err
    assert "step 1: non-finite loss" in err and "step 2: non-finite" in err
    assert "stopped: 2 steps in a row had a non-finite loss or gradient" in err
    assert "none was saved" in err and not (tmp_path / "out" / "final").exists()


def test_the_flags_take_effect(files, uninterrupted):
    """What argparse does not promise: each flag of the run changes what the run does.
    --steps 6, --eval-every 3, --save-every 3: the steps logged, evaluated and saved; --lr 1e-2
    and --warmup 1: each step's learning rate, 0 then the peak, decaying by a cosine towards a
    tenth of it at step 6; --batch-size 8, --seq-len 32: the run's record (which train.eval and
    --resume read). Then a run with --seed 1 (another data order: step 1's update is 0 at the
    warm-up's start, so step 2's loss differs from the first run's by its batch alone) and
    --log-every 2 (the even steps' rows alone). The other flags have their own tests here:
    --resume, the LoRA flags with --grad-accum, --remat, --unroll and --dtype, the processes."""
    out = files / "uninterrupted"
    rows = report.read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert saved_steps(out) == [3, 6]
    peak, end = 1e-2, 1e-3
    cosine = [end + (peak - end) * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(5)]
    np.testing.assert_allclose([r["lr"] for r in rows if "loss" in r], [0.0, *cosine],
                               rtol=1e-5, atol=0)
    record = json.loads((out / "run.json").read_text())
    assert (record["batch_size"], record["seq_len"], record["seed"]) == (8, 32, 0)

    seeded = files / "seed-1"  # --steps 6 as the first run: the same compiled step (cached)
    assert finetune.main(flags(files, seeded, "--seed", "1", "--log-every", "2",
                               "--save-every", "6", "--eval-every", "6")) == 0
    train, _ = losses(seeded)
    assert list(train) == [2, 4, 6] and train[2] != uninterrupted[0][2]


BAD = [
    (["--data", "missing.txt"], "missing.txt: no such data file"),
    (["--data", "empty.txt"], "empty.txt: the file is empty"),
    (["--data", "bad.jsonl"], r"bad.jsonl:2: expected a string field"),
    (["--seq-len", "200", "--init", "gpt2"], "--seq-len 200 is longer than the 128 positions"),
    (["--mesh", "1x3"], "num_attention_heads=8 is not divisible by the model axis 3"),
    (["--batch-size", "3"], r"micro-batch of 3 rows .* 2 data-parallel replicas \(D x F\)"),
    (["--mesh", "1x3x1", "--num-processes", "2", "--coordinator", "127.0.0.1:1"],
     r"--mesh 1x3x1 \(3 devices\) does not split evenly over 2 processes"),
    (["--resume", "--out", "empty-out"], "holds no checkpoint to resume from"),
    (["--resume", "--seq-len", "16"], "from another run .*seq_len: 32 there, 16 now"),
    ([], "already holds a run's checkpoints; pass --resume"),
    (["--lora-rank", "2", "--lora-targets", "q,fc"], "GPT-2|Mistral|mistral weights that LoRA"),
    (["--mesh", "1x8", "--init", "hf-folder"], "hf-folder is a Hugging Face model folder, not a "
     "mistral_jax checkpoint; convert it first: python -m convert.from_torch"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_and_overwrites_nothing(files, uninterrupted, tmp_path, extra,
                                                      message, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    if "gpt2" in extra:
        mistral_jax.save(mistral_jax.init(configs.preset("gpt2-tiny")), tmp_path / "gpt2")
    if "hf-folder" in extra:
        hf_model("llama", tmp_path / "hf-folder")
        capsys.readouterr()  # transformers' progress bar
    argv = flags(files, files / "uninterrupted")
    for i, arg in enumerate(extra):
        if i and extra[i - 1] in ("--data", "--init", "--out"):
            arg = str(tmp_path / arg)
        argv.append(arg)
    before = {p: p.stat().st_mtime_ns for p in (files / "uninterrupted").rglob("*")}
    assert finetune.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert {p: p.stat().st_mtime_ns for p in (files / "uninterrupted").rglob("*")} == before
    assert not (tmp_path / "empty-out").exists() or not any((tmp_path / "empty-out").iterdir())


def test_errors_from_the_command_line_are_one_line(tmp_path):
    """As `python -m train.finetune` (finetune.py runs as __main__): a usage error raised deep in
    the run is still reported in one line with exit code 2, not as a traceback."""
    proc = subprocess.run([sys.executable, "-m", "train.finetune", "--resume", "--out",
                           str(tmp_path / "none")], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: --resume: {tmp_path / 'none'} holds no checkpoint " \
        "to resume from"
    assert not (tmp_path / "none").exists()


def test_every_run_here_recorded_an_mfu_below_one(files, uninterrupted):
    """The runs this module made (full, resumed, killed, two processes, LoRA in bfloat16 with
    remat and accumulation, on 2x4 and 1x8): MFU below 100% at every step."""
    runs = sorted(files.rglob("metrics.jsonl"))
    assert files / "uninterrupted" / "metrics.jsonl" in runs
    for path in runs:
        assert_mfu_is_a_fraction(report.read_metrics(path.parent))
