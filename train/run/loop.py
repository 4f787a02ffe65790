"""The run: everything is checked before OUT is touched, then the model, data and optimizer are
set up on the mesh, and the loop steps, evaluates, logs and checkpoints until --steps."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from mistral_jax.arch.configs import model_type, to_hf_dict
from mistral_jax.base import trees
from mistral_jax.io import checkpoint, files, lora
from mistral_jax.model import registry as models
from mistral_jax.model.options import Options
from mistral_jax.parallel import devices
from mistral_jax.quant import int8 as quant
from mistral_jax.text.tokenizer import Tokenizer
from train.compute import flops
from train.compute import step as S
from train.input import data as D
from train.input import default
from train.run import report
from train.run.checkpoints import CHECKPOINTS, RunCheckpoints, has_checkpoints, saved_steps
from train.run.errors import UsageError

RUN_FILE, FINAL, ADAPTERS = "run.json", "final", "adapters"
# Flags that define a run's trajectory: --resume refuses a checkpoint made with others.
SAME_ON_RESUME = ("init", "seq_len", "batch_size", "grad_accum", "seed", "lora_rank",
                  "lora_targets", "lora_alpha", "isolate_documents", "dtype", "quantize_base")


class Stopped(RuntimeError):
    """The run stopped on purpose (non-finite steps); the last good checkpoint is intact."""


class Interrupted(RuntimeError):
    """Ctrl-C: the run stopped after its checkpoints were written out; `step` is the latest
    complete one (None if none was saved)."""

    def __init__(self, at: int, step: int | None, directory: Path):
        self.at, self.step, self.directory = at, step, directory
        super().__init__(f"interrupted at step {at}")


@dataclass
class Setup:
    """What a run needs that can be checked before anything is written."""

    config: object
    tokenizer: Tokenizer | None
    mesh: object
    messages: list[str]  # notes and warnings, said once every check has passed
    rows: D.Rows
    eval_rows: D.Rows | None
    run_record: dict


def set_up(args) -> Setup:
    out = Path(args.out)
    if args.init is None:
        config, tokenizer = default.CONFIG, default.tokenizer()
    else:
        config = checkpoint.read_config(args.init)
        if checkpoint.is_quantized(args.init) and not args.lora_rank:
            raise UsageError(f"--init {args.init} holds int8 weights, and training needs float "
                             "ones: start from the float checkpoint (converted without "
                             "--quantize), and quantize what it gives; or train LoRA adapters "
                             "over it (--lora-rank R), the base frozen in int8")
        if checkpoint.is_quantized(args.init) and args.merge_lora:
            raise UsageError(f"--merge-lora: --init {args.init} holds int8 weights, and adapters "
                             "merge into float ones: leave --merge-lora out, then merge the "
                             "adapters into the float checkpoint it was converted from: python "
                             "-m train.merge_lora FLOAT OUT/adapters MERGED")
        tokenizer = Tokenizer.from_dir(args.init)
    micro = args.batch_size // args.grad_accum if args.batch_size % args.grad_accum == 0 else None
    mesh, mesh_note = devices.mesh_for(args.mesh, config, micro_batch=micro)
    messages = [f"note: {mesh_note}"] if mesh_note else []
    D.check_batch(args.batch_size, args.grad_accum, mesh.shape["data"])
    if config.learned_positions is not None and args.seq_len > config.learned_positions:
        raise UsageError(f"--seq-len {args.seq_len} is longer than the "
                         f"{config.learned_positions} positions this GPT-2 has learned")
    if args.lora_rank:
        lora.check_targets(args.lora_targets, model_type(config))
    train_docs, eval_docs = _documents(args)
    pad = tokenizer.pad_id if tokenizer and tokenizer.pad_id is not None else \
        (tokenizer.eos_id if tokenizer else 0)
    packed = lambda docs: D.pack(D.tokenize(docs, tokenizer), args.seq_len, pad_id=pad,
                                 isolate_documents=args.isolate_documents)
    rows = packed(train_docs)
    if len(rows) < args.batch_size:
        messages.append("warning: " + D.describe(rows, len(train_docs), "the training data")
                        + f": fewer than one batch of {args.batch_size}, so each batch "
                        f"repeats rows; over {args.steps} step{'s' * (args.steps != 1)} each "
                        "row is seen about "
                        f"{args.steps * args.batch_size / len(rows):.0f} times")
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
    return Setup(config, tokenizer, mesh, messages, rows, eval_rows, record)


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


def run(args) -> None:
    setup = set_up(args)  # every check that can fail on bad input is made before this returns
    out = Path(args.out)
    primary = jax.process_index() == 0
    mesh = setup.mesh
    progress = report.Progress(args.steps)
    for message in setup.messages if primary else ():
        progress.message(message)
    if primary:
        out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / RUN_FILE, setup.run_record)

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    peak = flops.peak_flops_per_s(list(mesh.devices.flat), dtype)  # before any step: alone
    with jax.set_mesh(mesh):
        trainer = Trainer(args, setup, mesh, dtype, peak)
        checkpoints = RunCheckpoints(out, args.keep)
        batches = D.Batches(setup.rows, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            seed=args.seed, mesh=mesh)
        if args.resume:
            start = checkpoints.latest()
            trainer.state, record = checkpoints.restore(start, trainer.state)
            batches.position = record["data_position"]
            if record.get("data_fingerprint") != setup.rows.fingerprint and primary:
                progress.message("note: the training data differ from the checkpoint's; the "
                                 "run goes on with the new data")
            if primary:
                report.truncate_metrics(out, start)
                progress.message(f"resumed from step {start} in {out / 'checkpoints'}")
        interrupted = False
        try:
            trainer.loop(batches, checkpoints, progress, out if primary else None)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            checkpoints.close()  # waits for a save in flight
        if interrupted:
            steps = saved_steps(out)
            raise Interrupted(trainer.steps_done, steps[-1] if steps else None,
                              out / CHECKPOINTS)
        trainer.finish(out)
        if primary:
            if report.plot_loss(out) is None:
                progress.message("no loss.png: matplotlib is not installed")
            progress.message(trainer.next_step(out))


class Trainer:
    """The model, optimizer and jitted steps of one run, and its state."""

    def __init__(self, args, setup: Setup, mesh, dtype, peak: float):
        self.args, self.setup, self.mesh, self.dtype, self.peak = args, setup, mesh, dtype, peak
        self.steps_done = 0  # optimizer steps taken, kept on the host (the state is donated)
        options = Options(attention=args.attention, remat=args.remat, unroll=args.unroll)
        if args.init is None:
            model = models.init(setup.config, seed=args.seed, tokenizer=setup.tokenizer,
                                mesh=mesh, options=options)
        else:
            model = checkpoint.load(args.init, mesh=mesh, dtype=jnp.float32, options=options,
                                    quantize=args.quantize_base)
        self.quantized = quant.is_quantized(model)  # a frozen int8 base (QLoRA)
        weights = trees.weights(model)
        abstract = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        self.template = trees.with_weights(model, abstract(weights))
        adapted = self.template
        if args.lora_rank:
            self.scale = args.lora_alpha / args.lora_rank
            params = lora.init(weights, trees.logical_axes(model), args.lora_targets,
                               args.lora_rank, args.seed, mesh)
            self.frozen = weights
            # The adapters stay beside the frozen base (x W + scale (x A) B in each layer), never
            # merged into it: an int8 base stays int8, and a float base's step is faster than
            # with W + scale A B formed each step, whose backward computes W's full gradient
            # (bench/qlora.py, default model, batch 8 x 256, rank 8 on q,v, 2-core AMD EPYC:
            # 1.31 s a step against 1.43 merged, 0.93x; on every target 0.95x; int8 1.37 s)
            adapted = lora.attach(self.template, abstract(params), self.scale)
            self.assemble = lora.beside
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
        self.train_step = S.make_train_step(adapted, self.tx, shardings, **kwargs)
        self.eval_step = S.make_eval_step(adapted, **kwargs)
        self.eval_data = None
        if setup.eval_rows is not None:
            self.eval_data = D.eval_batch(setup.eval_rows, batch_size=args.batch_size,
                                          max_batches=args.eval_batches, mesh=mesh)
        self.flops = flops.training_flops(setup.config, lora_targets=args.lora_targets,
                                          lora_rank=args.lora_rank or 0)

    def model_flops(self, batches: D.Batches) -> float:
        """The model FLOPs of the step on the batch `batches` hands out next (compute.flops)."""
        segments = batches.rows.segments[batches.row_indices(batches.position)]
        pairs = flops.attention_pairs(segments, self.setup.config.sliding_window,
                                      self.args.isolate_documents)
        return self.flops.of(int((segments >= 0).sum()), pairs)

    def evaluate(self) -> tuple[float, float]:
        return S.mean_loss(*self.eval_step(self.state.params, self.frozen, self.eval_data))

    def loop(self, batches, checkpoints: RunCheckpoints, progress, out: Path | None) -> None:
        args = self.args
        metrics = report.Metrics(out) if out is not None else None
        tokens = args.batch_size * args.seq_len
        step, bad, last_saved = int(self.state.step), 0, checkpoints.latest()
        self.steps_done = step
        try:
            while step < args.steps:
                step_flops = self.model_flops(batches)
                start = time.perf_counter()
                self.state, m = self.train_step(self.state, self.frozen, next(batches))
                loss, finite, grad_norm = jax.device_get((m["loss"], m["finite"],
                                                          m["grad_norm"]))
                seconds = time.perf_counter() - start
                step += 1
                self.steps_done = step
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
                rate, achieved = tokens / seconds, step_flops / seconds
                if achieved > self.peak:  # measured while other work slowed the machine
                    self.peak = flops.peak_flops_per_s(list(self.mesh.devices.flat),
                                                       self.dtype, at_least=achieved)
                mfu = achieved / self.peak
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
                        "data_fingerprint": self.setup.rows.fingerprint})
                    last_saved = step
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()

    def finish(self, out: Path) -> None:
        """OUT/final (and OUT/adapters for LoRA), each written whole or not at all."""
        args = self.args
        if args.lora_rank:
            lora.write(self.state.params, out / ADAPTERS, rank=args.lora_rank,
                       alpha=args.lora_alpha, targets=args.lora_targets,
                       config=self.setup.config, base=self.setup.run_record.get("init"),
                       base_quantize="int8" if self.quantized else None)
            if not args.merge_lora:
                return
            if self.quantized:  # --quantize-base: merged into the float --init (set_up checked)
                model = checkpoint.load(args.init, mesh=self.mesh, adapters=out / ADAPTERS)
                checkpoint.save(model, out / FINAL, overwrite=True)
                return
            merge = lambda params, frozen: lora.merge(frozen, params, self.scale)  # noqa: E731
        else:
            merge = self.assemble
        weights = jax.jit(merge)(self.state.params, self.frozen)
        checkpoint.save(trees.with_weights(self.template, weights), out / FINAL,
                        overwrite=True)

    def next_step(self, out: Path) -> str:
        """What to run on what the run wrote."""
        prompt = "LAWYER, n." if self.args.init is None else "..."
        sampled = "--temperature 0.8 --top-p 0.95"  # greedy on a small model soon repeats
        if (out / FINAL).exists():
            return (f"wrote {out / FINAL}; try: python -m mistral_jax.generate {out / FINAL} "
                    f"\"{prompt}\" {sampled}")
        base = self.args.init  # an int8 --init: merged into the float one it came from
        base = "FLOAT" if self.quantized and checkpoint.is_quantized(base) else base
        return (f"wrote {out / ADAPTERS}; try: python -m mistral_jax.generate {self.args.init} "
                f"\"{prompt}\" {sampled} --adapters {out / ADAPTERS} (python -m train.merge_lora "
                f"{base} {out / ADAPTERS} OUT writes them merged)")
