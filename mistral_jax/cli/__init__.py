"""What the command lines share: one entry (`entry`: parse, refuse an existing OUT, make the
devices --mesh asks for, run), a help formatter that shows defaults, the --mesh / --dtype
flags, generate()'s sampling flags, and the rule that bad input ends in one line on stderr and
a non-zero exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from mistral_jax.parallel import devices

DTYPES = ("float32", "bfloat16", "float16")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default after its help (when it has one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings
                or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)


def add_mesh(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--mesh", default=default, metavar="DxT|DxFxT|auto",
                   help="device mesh: D-way data x F-way fully sharded data x T-way tensor "
                   "parallel over D*F*T devices (DxT is Dx1xT; T must divide the attention "
                   "heads, F the hidden size); on a CPU, fake CPU devices are made for "
                   "a mesh of more than one (they share the cores: slower than one); auto: on a "
                   "CPU the one real device, elsewhere every device with the largest T that "
                   "fits the model"
                   + ("" if default else "; default: one device"))


def add_attention(p: argparse.ArgumentParser) -> None:
    from mistral_jax.nn.attention import HELP, IMPLEMENTATIONS

    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto", help=HELP)


def add_dtype(p: argparse.ArgumentParser, what: str = "compute") -> None:
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help=f"cast the weights to this dtype ({what} in it; default: as saved)")


def add_model(p: argparse.ArgumentParser) -> None:
    """What loads a checkpoint for inference: --adapters, --mesh, --dtype, --attention,
    --quantize, --kv-cache-dtype."""
    p.add_argument("--adapters", default=None, metavar="DIR", help="LoRA adapters directory "
                   "(train.finetune's OUT/adapters) to apply to the checkpoint")
    add_mesh(p)
    add_dtype(p)
    add_attention(p)
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 weights with "
                   "per-channel scales (a checkpoint converted with --quantize is int8 already); "
                   "activations and the KV cache are then float32 unless --kv-cache-dtype says")
    p.add_argument("--kv-cache-dtype", choices=["int8", "bfloat16", "float16", "float32"],
                   default=None, help="the KV cache's dtype (default: the compute dtype); int8 "
                   "keeps a scale per token and head")


def add_sampling(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """generate()'s options for what it samples: --max-new-tokens, --temperature, --top-k,
    --top-p, --repetition-penalty, --seed (`sampling(args)` hands them back as its keywords)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is "
                   "greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample within the smallest set of "
                   "tokens holding this probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="CTRL's penalty on "
                   "tokens already in the text (> 1 discourages them; 1.2 breaks a greedy loop)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")


def sampling(args) -> dict:
    """The keywords of generate() that `add_sampling`'s flags set."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_model(args):
    """The checkpoint `args.ckpt` as `add_model`'s flags ask (devices.prepare ran before)."""
    from mistral_jax.base.notes import note
    from mistral_jax.io.checkpoint import load, read_config
    from mistral_jax.parallel import devices

    mesh, chosen = devices.mesh_for(args.mesh, read_config(args.ckpt))
    if chosen:
        note(chosen)
    return load(args.ckpt, mesh=mesh, dtype=args.dtype, adapters=args.adapters,
                attention=args.attention, quantize=args.quantize,
                kv_cache_dtype=args.kv_cache_dtype)


def entry(arguments: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
          argv=None, *, errors: tuple = (ValueError, OSError), code: int = 1) -> int:
    """Every command line's `main`: parse `argv`; then, with `run`'s rule for errors: refuse an
    OUT that exists without --overwrite (before any work), make the devices --mesh asks for
    (before JAX starts: --num-processes share them), and return `body(args)`'s exit code."""
    args = arguments.parse_args(argv)

    def start():
        check_out(args)
        devices.prepare(getattr(args, "mesh", None), getattr(args, "num_processes", 1))
        return body(args)

    return run(start, errors, code)


def check_out(args: argparse.Namespace) -> None:
    """A command that writes OUT (and has --overwrite) stops before any work if it exists."""
    from mistral_jax.io.files import DirectoryExists

    out, overwrite = getattr(args, "out", None), getattr(args, "overwrite", True)
    if out is not None and not overwrite and Path(out).exists():
        raise DirectoryExists(f"{out} already exists; pass --overwrite to replace it, or choose "
                              "another OUT")


def run(body: Callable[[], int | None], errors: tuple = (ValueError, OSError),
        code: int = 1) -> int:
    """`body()`'s exit code (0 for None); an expected error is one line on stderr and `code`."""
    try:
        return body() or 0
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return code
