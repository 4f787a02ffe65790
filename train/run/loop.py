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
from train.input.rows import packed_rows
from train.run import report
from train.run.checkpoints import CHECKPOINTS, RunCheckpoints, has_checkpoints, saved_steps
from train.run.errors import UsageError

RUN_FILE, FINAL, ADAPTERS = "run.json", "final", "adapters"
# Flags that define a run's trajectory: --resume refuses a checkpoint made with others (these,
# and the objective's own `same_on_resume`).
SAME_ON_RESUME = ("init", "seq_len", "batch_size", "grad_accum", "seed", "lora_rank",
                  "lora_targets", "lora_alpha", "isolate_documents", "dtype", "quantize_base")
# Flags recorded since a later version: a run.json without one ran with the value given here.
RECORDED_SINCE = {"loss_on": "assistant", "quantize_base": None}


class Stopped(RuntimeError):
    """The run stopped on purpose (non-finite steps); the last good checkpoint is intact."""


class Interrupted(RuntimeError):
    """Ctrl-C: the run stopped after its checkpoints were written out; `step` is the latest
    complete one (None if none was saved)."""

    def __init__(self, at: int, step: int | None, directory: Path):
        self.at, self.step, self.directory = at, step, directory
        super().__init__(f"interrupted at step {at}; " + (
            "no checkpoint was saved yet" if step is None else
            f"the last checkpoint is step {step} in {directory}: the same run with --resume "
            "(resume=True) continues it"))


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


def set_up(args, objective=None) -> Setup:
    objective = objective or CausalLM()
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
    D.check_batch(args.batch_size, args.grad_accum, mesh)
    if config.learned_positions is not None and args.seq_len > config.learned_positions:
        raise UsageError(f"--seq-len {args.seq_len} is longer than the "
                         f"{config.learned_positions} positions this GPT-2 has learned")
    if args.lora_rank:
        lora.check_targets(args.lora_targets, model_type(config))
    rows, eval_rows = objective.data(args, tokenizer, messages)
    same = SAME_ON_RESUME + objective.same_on_resume
    record = {"config": to_hf_dict(config), **{k: getattr(args, k) for k in same}}
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


class CausalLM:
    """What a run optimizes, here next-token prediction on packed documents; train.run.
    preference's `Preference` (DPO) is the other. An objective gives the data (`data`), its
    batches, the step's loss (`loss`), anything computed once before the first step
    (`prepare`), the work of a step (`work`: tokens and model FLOPs), the named values of the
    loss that each metrics row carries (`metrics`) and what an evaluation reports (`report`)."""

    kind = "finetune"
    same_on_resume: tuple[str, ...] = ("loss_on",)  # its own flags --resume must find the same
    metrics: tuple[str, ...] = ()
    loss_label = "cross-entropy (nats / token)"  # loss.png's y axis

    def data(self, args, tokenizer, messages: list[str]) -> tuple[D.Rows, D.Rows | None]:
        """(training rows, eval rows or None); warnings appended to `messages`."""
        return packed_rows(args, tokenizer, messages)

    def batches(self, rows, args, mesh):
        return D.Batches(rows, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seed=args.seed, mesh=mesh)

    def eval_batch(self, rows, args, mesh):
        return D.eval_batch(rows, batch_size=args.batch_size, max_batches=args.eval_batches,
                            mesh=mesh)

    def loss(self, trainer) -> S.Loss:
        return S.causal_lm_loss(trainer.adapted, dtype=trainer.dtype, assemble=trainer.assemble,
                                isolate_documents=trainer.args.isolate_documents)

    def prepare(self, trainer) -> None:
        """Nothing to compute before the first step."""

    def work(self, trainer, batches: D.Batches) -> tuple[int, float]:
        """(tokens, model FLOPs) of the step on the batch `batches` hands out next."""
        segments = batches.rows.segments[batches.row_indices(batches.position)]
        pairs = flops.attention_pairs(segments, trainer.setup.config.sliding_window,
                                      trainer.args.isolate_documents)
        return (trainer.args.batch_size * trainer.args.seq_len,
                trainer.flops.of(int((segments >= 0).sum()), pairs))

    def report(self, total, count, named) -> tuple[dict, str]:
        """(the eval metrics row's values, what the progress line says) of an eval step."""
        loss, ppl = S.mean_loss(total, count)
        return {"eval_loss": loss, "eval_ppl": ppl}, f"eval loss {loss:.4f}, perplexity {ppl:.2f}"


def _check_same_run(out: Path, record: dict) -> None:
    path = out / RUN_FILE
    if not path.is_file():
        raise UsageError(f"--resume: {path} is missing, so the checkpoints cannot be matched "
                         "to this run")
    saved = json.loads(path.read_text())
    saved = {**RECORDED_SINCE, **saved}
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in record.items()
              if json.loads(json.dumps(v)) != saved.get(k)]
    if differ:
        raise UsageError(f"--resume: the checkpoints in {out} are from another run ("
                         + "; ".join(differ) + "); use the same flags, or another --out")


def run(args, objective=None, *, on_step=None, on_eval=None) -> None:
    """The run `args` asks for, optimizing `objective` (default: the causal LM); `on_step` and
    `on_eval` are called with each metrics row written (by process 0)."""
    objective = objective or CausalLM()
    # every check that can fail on bad input is made before this returns
    setup = set_up(args, objective)
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
        trainer = Trainer(args, setup, mesh, dtype, peak, objective)
        checkpoints = RunCheckpoints(out, args.keep)
        batches = objective.batches(setup.rows, args, mesh)
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
            trainer.loop(batches, checkpoints, progress, out if primary else None,
                         on_step=on_step, on_eval=on_eval)
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
            if report.plot_loss(out, objective.loss_label) is None:
                progress.message("no loss.png: matplotlib is not installed")
            progress.message(trainer.next_step(out))


class Step:
    """What a run's step is made of, from its flags and a model: the template it runs, the
    trained params (all weights, or LoRA adapters beside the frozen base), the optimizer, the
    state's shardings and the jitted train and eval steps. `wire` reads only shapes and
    shardings, so the model may hold `jax.ShapeDtypeStruct`s: train.plan compiles this same
    step for a machine it does not have, with nothing allocated."""

    def __init__(self, args, mesh, dtype, objective=None):
        self.args, self.mesh, self.dtype = args, mesh, dtype
        self.objective = objective or CausalLM()
        self.options = Options(attention=args.attention, remat=args.remat, unroll=args.unroll)

    def wire(self, model) -> dict:
        """Builds the step around `model`; returns the params to train (arrays for arrays,
        shapes with shardings for shapes), which the state starts from."""
        args, mesh = self.args, self.mesh
        self.quantized = quant.is_quantized(model)  # a frozen int8 base (QLoRA)
        weights = trees.weights(model)
        self.template = trees.with_weights(model, _abstract(weights))
        self.adapted = self.template  # the model the step runs: with LoRA, adapters beside
        if args.lora_rank:
            self.scale = args.lora_alpha / args.lora_rank
            axes = trees.logical_axes(model)
            if all(isinstance(x, jax.Array) for x in jax.tree.leaves(weights)):
                params = lora.init(weights, axes, args.lora_targets, args.lora_rank, args.seed,
                                   mesh)
            else:  # shapes (train.plan): the adapters' shapes too
                params = lora.abstract(weights, axes, args.lora_targets, args.lora_rank, mesh)
            self.frozen = weights
            # The adapters stay beside the frozen base (x W + scale (x A) B in each layer), never
            # merged into it: an int8 base stays int8, and a float base's step is faster than
            # with W + scale A B formed each step, whose backward computes W's full gradient
            # (bench/qlora.py, default model, batch 8 x 256, rank 8 on q,v, 2-core AMD EPYC:
            # 1.31 s a step against 1.43 merged, 0.93x; on every target 0.95x; int8 1.37 s)
            self.adapted = lora.attach(self.template, _abstract(params), self.scale)
            self.assemble = lora.beside
            self.base = lambda frozen: frozen  # the weights without the adapters (DPO's reference)
        else:
            params, self.frozen = weights, {}
            self.assemble = lambda params, frozen: params
            self.base = None
        self.tx = S.optimizer(lr=args.lr, warmup=args.warmup, steps=args.steps,
                              weight_decay=args.weight_decay, clip=args.clip)
        self.schedule = S.learning_rate(lr=args.lr, warmup=args.warmup, steps=args.steps)
        self.shardings = S.state_shardings(params, self.tx, mesh)
        loss = self.objective.loss(self)
        self.train_step = S.make_train_step(self.tx, self.shardings, loss)
        self.eval_step = S.make_eval_step(loss)
        return params


def _abstract(tree):
    """`tree`'s leaves as shapes with their shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


class Trainer(Step):
    """The model, optimizer and jitted steps of one run, and its state."""

    def __init__(self, args, setup: Setup, mesh, dtype, peak: float, objective=None):
        super().__init__(args, mesh, dtype, objective)
        self.setup, self.peak = setup, peak
        self.steps_done = 0  # optimizer steps taken, kept on the host (the state is donated)
        if args.init is None:
            model = models.init(setup.config, seed=args.seed, tokenizer=setup.tokenizer,
                                mesh=mesh, options=self.options)
        else:
            model = checkpoint.load(args.init, mesh=mesh, dtype=jnp.float32, options=self.options,
                                    quantize=args.quantize_base)
        params = self.wire(model)
        self.state = S.init_state(params, self.tx, args.seed, self.shardings)
        self.flops = flops.training_flops(setup.config, lora_targets=args.lora_targets,
                                          lora_rank=args.lora_rank or 0)
        self.objective.prepare(self)  # on the initial weights, before a resumed run restores
        self.eval_data = None
        if setup.eval_rows is not None:
            self.eval_data = self.objective.eval_batch(setup.eval_rows, args, mesh)

    def evaluate(self) -> tuple[dict, str]:
        """(the eval metrics row's values, what to say) on the eval data."""
        return self.objective.report(*self.eval_step(self.state.params, self.frozen,
                                                     self.eval_data))

    def loop(self, batches, checkpoints: RunCheckpoints, progress, out: Path | None, *,
             on_step=None, on_eval=None) -> None:
        args = self.args
        metrics = report.Metrics(out) if out is not None else None

        def write(row, callback):
            if metrics is not None:
                metrics.write(row)
                if callback is not None:
                    callback(row)

        step, bad, last_saved = int(self.state.step), 0, checkpoints.latest()
        self.steps_done = step
        try:
            while step < args.steps:
                tokens, step_flops = self.objective.work(self, batches)
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
                if step % args.log_every == 0:
                    named = jax.device_get({k: m[k] for k in self.objective.metrics})
                    write({"step": step, "loss": float(loss),
                           **{k: float(named[k]) for k in self.objective.metrics},
                           "tokens_per_s": rate,
                           "lr": float(self.schedule(step - 1)),
                           "grad_norm": float(grad_norm), "mfu": mfu}, on_step)
                if self.eval_data is not None and (step % args.eval_every == 0
                                                   or step == args.steps):
                    values, said = self.evaluate()
                    progress.message(f"step {step}: {said}")
                    write({"step": step, **values}, on_eval)
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
