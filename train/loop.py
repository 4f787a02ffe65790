"""The run: everything is checked before OUT is touched, then the model, data and optimizer are
set up on the mesh, and the loop steps, evaluates, logs and checkpoints until --steps."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from mistral_jax import checkpoint, models, sharding
from mistral_jax.configs import GPT2Config, to_hf_dict
from mistral_jax.tokenizer import Tokenizer
from train import data as D
from train import default, devices, export, flops, lora, report
from train import step as S
from train.checkpoints import RunCheckpoints, has_checkpoints
from train.errors import UsageError

RUN_FILE = "run.json"
# Flags that define a run's trajectory: --resume refuses a checkpoint made with others.
SAME_ON_RESUME = ("init", "seq_len", "batch_size", "grad_accum", "seed", "lora_rank",
                  "lora_targets", "lora_alpha", "isolate_documents", "dtype")


class Stopped(RuntimeError):
    """The run stopped on purpose (non-finite steps); the last good checkpoint is intact."""


@dataclass
class Plan:
    """What a run needs that can be checked before anything is written."""

    config: object
    tokenizer: Tokenizer | None
    rows: D.Rows
    eval_rows: D.Rows | None
    run_record: dict


def plan(args) -> Plan:
    out = Path(args.out)
    if args.init is None:
        config, tokenizer = default.CONFIG, default.tokenizer()
    else:
        config = checkpoint.read_config(args.init)
        tokenizer = Tokenizer.from_dir(args.init)
    data_axis, model_axis = sharding.parse_mesh(args.mesh)
    sharding.check_layout(config, model_axis)
    D.check_batch(args.batch_size, args.grad_accum, data_axis)
    if isinstance(config, GPT2Config) and args.seq_len > config.n_positions:
        raise UsageError(f"--seq-len {args.seq_len} is longer than the {config.n_positions} "
                         "positions this GPT-2 has learned")
    if args.lora_rank:
        lora.check_targets(args.lora_targets, to_hf_dict(config)["model_type"])
    train_docs, eval_docs = _documents(args)
    pad = tokenizer.pad_id if tokenizer and tokenizer.pad_id is not None else \
        (tokenizer.eos_id if tokenizer else 0)
    packed = lambda docs: D.pack(D.tokenize(docs, tokenizer), args.seq_len, pad_id=pad,
                                 isolate_documents=args.isolate_documents)
    rows = packed(train_docs)
    eval_rows = packed(eval_docs) if eval_docs else None
    record = {"config": to_hf_dict(config), **{k: getattr(args, k) for k in SAME_ON_RESUME}}
    if args.init is not None:
        record["init"] = str(Path(args.init).absolute())
    if args.resume:
        if not has_checkpoints(out):
            raise UsageError(f"--resume: {out} holds no checkpoint to resume from")
        _check_same_run(out, record)
    elif has_checkpoints(out):
        raise UsageError(f"{out} already holds a run's checkpoints; pass --resume to continue "
                         "it, or choose another --out")
    return Plan(config, tokenizer, rows, eval_rows, record)


def _documents(args) -> tuple[list[D.Document], list[D.Document]]:
    if args.data:
        train = [d for f in args.data for d in D.read_documents(f)]
    else:
        train = default.documents()[0]
    if args.eval_data:
        held_out = [d for f in args.eval_data for d in D.read_documents(f)]
    else:
        held_out = default.documents()[1] if not args.data else []
    return train, held_out


def _check_same_run(out: Path, record: dict) -> None:
    path = out / RUN_FILE
    if not path.is_file():
        raise UsageError(f"--resume: {path} is missing, so the checkpoints cannot be matched "
                         "to this run")
    saved = json.loads(path.read_text())
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in record.items()
              if json.loads(json.dumps(v)) != saved.get(k)]
    if differ:
        raise UsageError(f"--resume: the checkpoints in {out} are from another run ("
                         + "; ".join(differ) + "); use the same flags, or another --out")


def run(args, device_note: str | None = None) -> None:
    p = plan(args)  # every check that can fail on bad input happens before this line returns
    out = Path(args.out)
    primary = jax.process_index() == 0
    data_size, model_size = sharding.parse_mesh(args.mesh)
    mesh = sharding.make_mesh(args.mesh, devices.mesh_devices(data_size, model_size))
    progress = report.Progress(args.steps)
    if primary and device_note and mesh.devices.flat[0].platform == "cpu":
        progress.message(f"--mesh {args.mesh}: using {data_size * model_size} CPU devices "
                         f"(set {device_note} before JAX started)")
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(p.run_record, indent=2) + "\n")

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    peak = flops.peak_flops_per_s(list(mesh.devices.flat), dtype)  # outside the mesh: one device
    with jax.set_mesh(mesh):
        trainer = Trainer(args, p, mesh, dtype, peak)
        checkpoints = RunCheckpoints(out, args.keep)
        batches = D.Batches(p.rows, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            seed=args.seed, mesh=mesh)
        if args.resume:
            start = checkpoints.latest()
            trainer.state, record = checkpoints.restore(start, trainer.state)
            batches.position = record["data_position"]
            if record.get("data_fingerprint") != p.rows.fingerprint and primary:
                progress.message("note: the training data differ from the checkpoint's; the "
                                 "run goes on with the new data")
            if primary:
                report.truncate_metrics(out, start)
                progress.message(f"resumed from step {start} in {out / 'checkpoints'}")
        try:
            trainer.loop(batches, checkpoints, progress, out if primary else None)
        finally:
            checkpoints.close()
        trainer.finish(out)
        if primary:
            if report.plot_loss(out) is None:
                progress.message("no loss.png: matplotlib is not installed")
            final = out / export.FINAL
            prompt = "LAWYER, n." if args.init is None else "..."
            progress.message(f"wrote {final}; try: python -m mistral_jax.generate {final} "
                             f"\"{prompt}\"" if final.exists() else
                             f"wrote {out / export.ADAPTERS} (--merge-lora writes {final})")


class Trainer:
    """The model, optimizer and jitted steps of one run, and its state."""

    def __init__(self, args, p: Plan, mesh, dtype, peak: float):
        self.args, self.plan, self.mesh, self.peak = args, p, mesh, peak
        if args.init is None:
            model = models.init(p.config, seed=args.seed, tokenizer=p.tokenizer, mesh=mesh)
        else:
            model = checkpoint.load(args.init, mesh=mesh, dtype=jnp.float32)
        weights = models.weights(model)
        self.template = models.with_weights(model, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), weights))
        self.template.remat = args.remat
        self.template.unroll = args.unroll
        if args.lora_rank:
            self.scale = args.lora_alpha / args.lora_rank
            params = lora.init(weights, models.logical_axes(model), args.lora_targets,
                               args.lora_rank, args.seed, mesh)
            self.frozen = weights
            self.assemble = lambda params, frozen: lora.merge(frozen, params, self.scale)
        else:
            params, self.frozen = weights, {}
            self.assemble = lambda params, frozen: params
        self.tx = S.optimizer(lr=args.lr, warmup=args.warmup, steps=args.steps,
                              weight_decay=args.weight_decay, clip=args.clip)
        self.schedule = S.learning_rate(lr=args.lr, warmup=args.warmup, steps=args.steps)
        shardings = S.state_shardings(params, self.tx, mesh)
        self.state = S.init_state(params, self.tx, args.seed, shardings)
        kwargs = dict(dtype=dtype, assemble=self.assemble,
                      isolate_documents=args.isolate_documents)
        self.train_step = S.make_train_step(self.template, self.tx, shardings, **kwargs)
        self.eval_step = S.make_eval_step(self.template, **kwargs)
        self.eval_data = None
        if p.eval_rows is not None:
            self.eval_data = D.eval_batch(p.eval_rows, batch_size=args.batch_size,
                                          max_batches=args.eval_batches, mesh=mesh)
        self.flops_per_token = flops.training_flops_per_token(p.config, args.seq_len)

    def evaluate(self) -> tuple[float, float]:
        total, count = self.eval_step(self.state.params, self.frozen, self.eval_data)
        loss = float(total) / max(int(count), 1)
        return loss, math.exp(min(loss, 50.0))

    def loop(self, batches, checkpoints: RunCheckpoints, progress, out: Path | None) -> None:
        args = self.args
        metrics = report.Metrics(out) if out is not None else None
        tokens = args.batch_size * args.seq_len
        step, bad, last_saved = int(self.state.step), 0, checkpoints.latest()
        try:
            while step < args.steps:
                start = time.perf_counter()
                self.state, m = self.train_step(self.state, self.frozen, next(batches))
                loss, finite, grad_norm = jax.device_get((m["loss"], m["finite"],
                                                          m["grad_norm"]))
                seconds = time.perf_counter() - start
                step += 1
                if not finite:
                    bad += 1
                    progress.message(f"step {step}: non-finite loss {loss} or gradient norm "
                                     f"{grad_norm}; the update was skipped")
                    if bad >= args.max_bad_steps:
                        where = (f"step {last_saved} in {checkpoints.manager.directory}"
                                 if last_saved is not None else "none was saved")
                        raise Stopped(f"{bad} steps in a row had a non-finite loss or gradient "
                                      f"(last at step {step}); the last good checkpoint is "
                                      f"{where}. Lower --lr, or check the data and --init")
                    continue
                bad = 0
                rate = tokens / seconds
                mfu = self.flops_per_token * rate / self.peak
                progress.update(step, float(loss), rate, mfu)
                if metrics is not None and step % args.log_every == 0:
                    metrics.write({"step": step, "loss": float(loss), "tokens_per_s": rate,
                                   "lr": float(self.schedule(step - 1)),
                                   "grad_norm": float(grad_norm), "mfu": mfu})
                if self.eval_data is not None and (step % args.eval_every == 0
                                                   or step == args.steps):
                    eval_loss, ppl = self.evaluate()
                    progress.message(f"step {step}: eval loss {eval_loss:.4f}, perplexity "
                                     f"{ppl:.2f}")
                    if metrics is not None:
                        metrics.write({"step": step, "eval_loss": eval_loss, "eval_ppl": ppl})
                if step % args.save_every == 0 or step == args.steps:
                    checkpoints.save(step, self.state, {
                        "data_position": batches.position,
                        "data_fingerprint": self.plan.rows.fingerprint})
                    last_saved = step
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()

    def finish(self, out: Path) -> None:
        """OUT/final (and OUT/adapters for LoRA)."""
        args = self.args
        if args.lora_rank:
            export.write_adapters(self.state.params, out / export.ADAPTERS, rank=args.lora_rank,
                                  alpha=args.lora_alpha, targets=args.lora_targets,
                                  base=self.plan.run_record.get("init"))
            if not args.merge_lora:
                return
        weights = jax.jit(self.assemble)(self.state.params, self.frozen)
        export.write_model(self.template, weights, out / export.FINAL)
