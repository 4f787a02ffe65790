"""Plan a run before renting the machine: the fine-tuning run's own train step compiled ahead of
time for a target you do not have, on abstract arrays (`jax.jit(...).lower(...).compile()` on
`jax.ShapeDtypeStruct`s; nothing is allocated), and what it needs per device.

    python -m train.plan --model mistral-7b --topology v5e-8 --mesh 1x8 \\
        --batch-size 8 --seq-len 4096 --dtype bfloat16 --remat full
    python -m train.plan --model mistral-7b --topology v5e-64 --mesh 1x16x4 \\
        --batch-size 16 --seq-len 4096 --dtype bfloat16 --remat full --lora-rank 16
    python -m train.plan --model ckpt/ --topology cpu:8 --mesh 2x4 --batch-size 8 --seq-len 256
    python -m train.plan --model mistral-7b --topology v5e-8 --mesh 1x8 --serve \\
        --batch-size 16 --seq-len 4096 --dtype bfloat16

--topology is a TPU slice (v5e-8, v5p-64, v4-8, v6e-8, ...; through libtpu's compile-only
client, as MaxText's train_compile does) or cpu:N (N fake CPU devices). It prints, per device,
XLA's argument, output and temporary bytes, the FLOPs of the step, each collective with its
bytes and the step time at --mfu (an estimate), and ends with one line: `fits` or `does not fit`,
the bytes against the chip's memory (exit 0 either way). With --serve: one decode step of a KV
cache of --batch-size rows x --seq-len entries, its weights and cache per device.
The flags shared with `python -m train.finetune` are its own (same names, values, checks).
"""

from __future__ import annotations

import argparse
import math
import sys

from train.run import flags

# train.finetune's flags that shape the step (their definitions, borrowed whole)
BORROWED = ("mesh", "batch_size", "seq_len", "grad_accum", "remat", "unroll", "attention",
            "dtype", "isolate_documents", "lora_rank", "lora_targets", "lora_alpha")
PRESETS = ("mistral-7b", "megatron-gpt2-345m")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="PRESET|CKPT", help="a preset ("
                   + ", ".join(PRESETS) + ", or any of mistral_jax.arch.configs.PRESETS) or a "
                   "checkpoint directory (only its config.json is read)")
    p.add_argument("--topology", required=True, metavar="SLICE|cpu:N", help="what to compile "
                   "for: a TPU slice (v4-8, v5e-8, v5e-64, v5p-8, v5p-64, v6e-8, ...; needs "
                   "libtpu, which scripts/setup.sh installs) or cpu:N, N fake CPU devices")
    p.add_argument("--serve", action="store_true", help="plan the decode step of a KV cache of "
                   "--batch-size rows x --seq-len entries instead of the train step")
    p.add_argument("--mfu", type=flags.positive(float), default=0.4, help="the model FLOPs "
                   "utilization the step-time estimate assumes (default 0.4)")
    source = flags.parser("finetune", None)
    for action in source._actions:
        if action.dest in BORROWED:
            if action.dest in ("batch_size", "seq_len"):
                action.required = True  # a plan is of a size; the run's defaults are not one
                action.help = action.help.split(" (default")[0]
            p._add_action(action)
    return p


def _fill(args: argparse.Namespace) -> argparse.Namespace:
    """The run's defaults for what the plan does not ask (learning rate, steps, seed): they
    shape no array."""
    for name, value in vars(flags.parser("finetune", None).parse_args([])).items():
        if not hasattr(args, name):
            setattr(args, name, value)
    args.init, args.out = args.model, "-"  # a run from a checkpoint; nothing is written
    return flags.with_defaults(args, "finetune")


def _config(model: str):
    from pathlib import Path

    from mistral_jax.arch.configs import PRESETS as ALL
    from mistral_jax.arch.configs import preset
    from mistral_jax.io import checkpoint
    from train.run.errors import UsageError

    if model in ALL:
        return preset(model)
    if not (Path(model) / "config.json").is_file():
        raise UsageError(f"--model {model}: neither a preset ({', '.join(ALL)}) nor a "
                         "checkpoint directory with a config.json")
    return checkpoint.read_config(model)


def _mesh(args, config, devices):
    """The mesh --mesh names over the target's devices, checked as a run checks it."""
    from mistral_jax.parallel import devices as D
    from mistral_jax.parallel.sharding import (
        FSDP,
        MODEL,
        ShardingError,
        check_layout,
        make_mesh,
        parse_mesh,
    )

    spec = args.mesh
    micro = None if args.serve else args.batch_size // args.grad_accum
    if spec == D.AUTO:
        found = next(D.fitting_meshes(config, [len(devices)], micro), None)
        if found is None:
            raise ShardingError(f"--mesh auto: no mesh over {len(devices)} devices fits")
        spec = "x".join(map(str, found))
    try:
        size = math.prod(parse_mesh(spec))  # D x F x T
        if size != len(devices):
            raise ShardingError(f"{size} devices, and --topology {args.topology} has "
                                f"{len(devices)}")
        mesh = make_mesh(spec, devices)
        check_layout(config, mesh.shape[MODEL], mesh.shape[FSDP])
    except ShardingError as e:
        raise ShardingError(f"--mesh {spec}: {e}") from None
    return mesh


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def plan(args: argparse.Namespace) -> list[str]:
    """The plan's lines (after `targets.prepare`)."""
    from train.plan import build, report, targets

    config = _config(args.model)
    target = targets.parse(args.topology)
    mesh = _mesh(args, config, targets.devices(target))
    what = ("decode step" if args.serve else "train step, "
            + (f"LoRA rank {args.lora_rank} on {','.join(args.lora_targets)}" if args.lora_rank
               else "full fine-tune"))
    head = [f"plan: {args.model} ({_count(config.num_params())} parameters), {what}, batch "
            f"{args.batch_size} x {args.seq_len} tokens, {args.dtype} compute, remat "
            f"{args.remat}",
            f"target: {target.describe()}",
            f"mesh: {args.mesh} -> " + ", ".join(f"{k} {v}" for k, v in mesh.shape.items())]
    compiled = (build.decode_step if args.serve else build.train_step)(args, config, mesh)
    parts = {k: build.shard_bytes(v) for k, v in compiled.arguments.items()}
    said = (report.lines(compiled.compiled, target.chip, target.count, compiled.model_flops,
                         args.mfu, parts) if compiled.refused is None else
            report.refusal(compiled.refused, target.chip, target.count, compiled.model_flops,
                           args.mfu, parts))
    return head + said


def main(argv=None) -> int:
    from mistral_jax import cli
    from train.plan import targets
    from train.run.errors import errors

    args = parser().parse_args(argv)

    def body():
        _fill(args)
        if args.lora_rank and args.serve:
            raise targets.TargetError("--serve plans the base model's decode step; leave out "
                                      "--lora-rank")
        targets.prepare(targets.parse(args.topology))
        for line in plan(args):
            print(line, flush=True)

    return cli.run(body, errors() + (targets.TargetError,), code=2)


if __name__ == "__main__":
    sys.exit(main())
