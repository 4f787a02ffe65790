"""Fine-tuning and preference tuning from Python (a notebook, a script): the runs of
`python -m train.finetune` and `python -m train.dpo`, with the command lines' options as keyword
arguments named as the flags, with underscores (--batch-size is batch_size=).

    from train.api import finetune, dpo

    result = finetune(init="ckpt/", data="train.jsonl", eval_data="val.jsonl", out="run/",
                      steps=100, lora_rank=8, on_step=lambda row: print(row["loss"]))
    result.metrics      # the rows of OUT/metrics.jsonl, as dicts
    result.out          # OUT, a Path
    result.eval_loss    # the last evaluation's loss (None without eval data)

`on_step(row)` and `on_eval(row)` are called with each metrics row as it is written. The
options go through the command line's own parser, so they take the same values and defaults
and are checked the same way; a problem raises rather than exits: UsageError (an option: its
flag named), DataError (a data file: its line named), CheckpointError, ShardingError, LoraError,
Stopped (non-finite steps), Interrupted (Ctrl-C, or a notebook's interrupt: `resume=True` with
the same options continues the run). The command lines are this module with argparse before it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from train.input.data import DataError
from train.run import flags
from train.run.errors import UsageError, errors
from train.run.loop import Interrupted, Stopped

__all__ = ["DataError", "Interrupted", "Result", "Stopped", "UsageError", "dpo", "finetune"]

Callback = Callable[[dict], object] | None


@dataclass
class Result:
    """What a run leaves: its output directory, its metrics rows, its last eval loss."""

    out: Path
    metrics: list[dict]
    eval_loss: float | None


def finetune(*, on_step: Callback = None, on_eval: Callback = None, **options) -> Result:
    """A `python -m train.finetune` run with `options` as its flags (see its --help)."""
    return start(arguments("finetune", options), "finetune", on_step=on_step, on_eval=on_eval)


def dpo(*, on_step: Callback = None, on_eval: Callback = None, **options) -> Result:
    """A `python -m train.dpo` run with `options` as its flags (see its --help)."""
    return start(arguments("dpo", options), "dpo", on_step=on_step, on_eval=on_eval)


def arguments(kind: str, options: dict) -> argparse.Namespace:
    """`options` as the command line's flags, parsed by its parser (a bad value raises a
    UsageError naming the keyword and its flag)."""
    parser = flags.parser(kind, None, raising=True)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    argv = []
    for name, value in options.items():
        if name not in actions:
            raise UsageError(f"{kind}() has no option {name}=; its options are the flags of "
                             f"python -m train.{kind} with underscores: "
                             f"{', '.join(sorted(actions))}")
        if value is None:
            continue
        action, flag = actions[name], actions[name].option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true
            if value not in (True, False):
                raise UsageError(f"{name}={value!r} ({flag}): must be True or False")
            argv += [flag] if value else []
        elif action.nargs == "+":
            values = [value] if isinstance(value, str | os.PathLike) else list(value)
            argv += [flag, *map(str, values)]
        elif isinstance(value, list | tuple):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    try:
        return parser.parse_args(argv)
    except UsageError as e:
        raise UsageError(_named(str(e), actions, options)) from None


def _named(message: str, actions: dict, options: dict) -> str:
    """argparse's "argument --steps: must be positive, got 0" as "steps=0 (--steps): must be
    positive, got 0"."""
    for name, action in actions.items():
        prefix = f"argument {'/'.join(action.option_strings)}: "
        if message.startswith(prefix) and name in options:
            return (f"{name}={options[name]!r} ({action.option_strings[0]}): "
                    f"{message[len(prefix):]}")
    return message


def objective(kind: str):
    from train.run.loop import CausalLM
    from train.run.preference import Preference

    return Preference() if kind == "dpo" else CausalLM()


def start(args: argparse.Namespace, kind: str, *, on_step: Callback = None,
          on_eval: Callback = None) -> Result:
    """The run `args` asks for: defaults filled in, checked, the devices made (when JAX has not
    started yet), then train.run.loop.run with `kind`'s objective."""
    import logging

    from mistral_jax.base.notes import LOGGER
    from mistral_jax.parallel import devices
    from train.run import report
    from train.run.loop import run

    args = flags.with_defaults(args, kind)
    flags.check(args, kind)
    devices.prepare(args.mesh, args.num_processes)
    devices.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    if jax.process_index() != 0:  # one process speaks for the run
        LOGGER.setLevel(logging.ERROR)
    run(args, objective(kind), on_step=on_step, on_eval=on_eval)
    rows = report.read_metrics(Path(args.out))
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return Result(Path(args.out), rows, evals[-1] if evals else None)


def main(kind: str, parser: argparse.ArgumentParser, argv=None) -> int:
    """`python -m train.KIND`: parse, then `start`, a stop or an interruption ending in what to
    do next and its exit code (3 stopped, 130 interrupted, 2 bad input)."""
    from mistral_jax import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.entry(parser, lambda args: _command(args, argv, kind), argv, errors=errors(),
                     code=2)


def _command(args: argparse.Namespace, argv: list[str], kind: str) -> int:
    try:
        start(args, kind)
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        if e.step is None:
            print(f"interrupted at step {e.at}: no checkpoint was saved yet", file=sys.stderr)
        else:
            print(f"interrupted at step {e.at}; the last checkpoint is step {e.step} in "
                  f"{e.directory}; continue with:\n  "
                  f"{flags.resume_command(argv, args.out, kind)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before the first step: nothing was saved", file=sys.stderr)
        return 130
    return 0
