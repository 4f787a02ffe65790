"""Preference tuning as a run's objective (`python -m train.dpo`): pairs for data, DPO or IPO
for the loss (train.compute.preference), rewards and accuracy in every metrics row; the rest
of the run (mesh, steps, checkpoints, resume, eval, metrics, loss.png) is train.run.loop's.

The reference model: with LoRA, the frozen base without its adapters, run in each step on the
same arrays (no second copy of the weights). With full tuning, the initial weights: their
log-probabilities of every response (the training and eval pairs) are computed once, before
the first step, kept with the pairs and fed with each batch, and stored in OUT/reference.npz,
so that --resume reads them rather than loading --init again; were the file lost, a resumed
run computes them again from --init (deterministic on the same mesh).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from mistral_jax.base.notes import note
from train.compute import flops
from train.compute import preference as P
from train.input import prefs

REFERENCE_FILE = "reference.npz"


class Preference:
    """The objective train.run.loop.run optimizes for `python -m train.dpo` (see
    loop.CausalLM for what an objective gives)."""

    kind = "dpo"
    same_on_resume = ("beta", "loss")
    metrics = P.METRICS
    loss_label = "preference loss (mean over pairs)"  # loss.png's y axis

    def data(self, args, tokenizer, messages: list[str]):
        pad = tokenizer.pad_id if tokenizer and tokenizer.pad_id is not None else \
            (tokenizer.eos_id if tokenizer else 0)
        rows = self._rows(args.data, "training", args, tokenizer, pad, messages)
        if len(rows) < args.batch_size:
            messages.append(f"warning: the training data hold {len(rows)} pair"
                            f"{'s' * (len(rows) != 1)}, fewer than one batch of "
                            f"{args.batch_size}, so each batch repeats pairs")
        eval_rows = None
        if args.eval_data:
            eval_rows = self._rows(args.eval_data, "eval", args, tokenizer, pad, messages)
        return rows, eval_rows

    @staticmethod
    def _rows(paths, what, args, tokenizer, pad, messages) -> prefs.PairRows:
        pairs = [p for f in paths for p in prefs.read_pairs(f, tokenizer)]
        rows, cut = prefs.rows(pairs, args.seq_len, pad_id=pad)
        if cut:
            messages.append(f"warning: {cut} of {len(pairs)} {what} pairs are longer than "
                            f"--seq-len {args.seq_len}: their prompts lose their start (and, "
                            "where that is not enough, the responses their end)")
        return rows

    def batches(self, rows, args, mesh):
        return prefs.PairBatches(rows, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                 seed=args.seed, mesh=mesh)

    def eval_batch(self, rows, args, mesh):
        return prefs.eval_batch(rows, batch_size=args.batch_size,
                                max_batches=args.eval_batches, mesh=mesh)

    def loss(self, trainer):
        return P.preference_loss(trainer.adapted, dtype=trainer.dtype,
                                 assemble=trainer.assemble, base=trainer.base,
                                 reference_template=trainer.template,
                                 beta=trainer.args.beta, kind=trainer.args.loss)

    def prepare(self, trainer) -> None:
        """Full tuning: every response's log-probability under the initial weights, read from
        OUT/reference.npz when it holds these pairs' (a resumed run), else computed and
        stored there."""
        if trainer.base is not None:  # LoRA: the step runs the reference itself
            return
        setup, args = trainer.setup, trainer.args
        parts = {"train": setup.rows}
        if setup.eval_rows is not None:
            parts["eval"] = setup.eval_rows
        path = Path(args.out) / REFERENCE_FILE
        stored = _read(path, parts)
        pairs = sum(len(rows) for rows in parts.values())
        if stored is not None:
            note(f"the reference's log-probabilities of {pairs} pairs: read from {path}")
        else:
            note(f"the reference's log-probabilities of {pairs} pairs (--init's): computed once, "
                 f"before the first step, and kept in {path}")
            step = P.make_reference_step(trainer.template, trainer.mesh, dtype=trainer.dtype)
            weights = trainer.assemble(trainer.state.params, trainer.frozen)
            stored = {name: _reference(step, weights, rows, args, trainer.mesh)
                      for name, rows in parts.items()}
            if jax.process_index() == 0:
                _write(path, stored, parts)
        setup.rows = setup.rows.with_reference(stored["train"])
        if setup.eval_rows is not None:
            setup.eval_rows = setup.eval_rows.with_reference(stored["eval"])

    def work(self, trainer, batches) -> tuple[int, float]:
        """(tokens, model FLOPs) of the next step: the policy trained on both rows of each
        pair, and under LoRA the reference's forward pass on them too."""
        segments = batches.rows.segments[batches.row_indices(batches.position)]
        config = trainer.setup.config
        tokens = int((segments >= 0).sum())
        seen = flops.attention_pairs(segments, config.sliding_window, True)
        total = trainer.flops.of(tokens, seen)
        if trainer.base is not None:
            total += flops.forward_flops(config).of(tokens, seen)
        return tokens, total

    def report(self, total, count, named) -> tuple[dict, str]:
        n = max(int(count), 1)
        values = {"eval_loss": float(total) / n,
                  **{f"eval_{k}": float(named[k]) / n for k in P.METRICS}}
        return values, (f"eval loss {values['eval_loss']:.4f}, accuracy "
                        f"{values['eval_accuracy']:.2f}, reward margin "
                        f"{values['eval_rewards_margin']:.4f}")


def _reference(step, weights, rows: prefs.PairRows, args, mesh) -> np.ndarray:
    """[pairs, 2]: the reference's log-probability of each response of `rows`."""
    out = [np.asarray(jax.device_get(step(weights, batch))).reshape(-1, 2)
           for batch in prefs.in_order(rows, batch_size=args.batch_size,
                                       grad_accum=args.grad_accum, mesh=mesh)]
    return np.concatenate(out)[:len(rows)]


def _read(path: Path, parts: dict) -> dict | None:
    """The stored log-probabilities when `path` holds those of exactly these pairs."""
    if not path.is_file():
        return None
    with np.load(path) as stored:
        if all(f"{name}_fingerprint" in stored and str(stored[f"{name}_fingerprint"])
               == rows.fingerprint and name in stored for name, rows in parts.items()):
            return {name: stored[name] for name in parts}
    return None


def _write(path: Path, stored: dict, parts: dict) -> None:
    """`path` written whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **stored, **{f"{name}_fingerprint": np.asarray(rows.fingerprint)
                                 for name, rows in parts.items()})
    os.replace(tmp, path)
