"""Stream a completion of PROMPT from the checkpoint CKPT to stdout.

    python -m mistral_jax.generate ckpt/ "My favourite condiment is" --max-new-tokens 40
    python -m mistral_jax.generate ckpt/ "Hello!" --chat --mesh 1x8 --verbose
    python -m mistral_jax.generate base/ "LAWYER, n." --adapters run/adapters
"""

from __future__ import annotations

import sys
import time

from mistral_jax import cli, devices


def arguments():
    p = cli.parser("python -m mistral_jax.generate", __doc__)
    p.add_argument("ckpt", help="checkpoint directory (convert.from_torch or train.finetune "
                   "writes one)")
    p.add_argument("prompt", help="text to complete (with --chat: the user's message)")
    cli.add_sampling(p, max_new_tokens=64)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="end at this "
                   "text, not printed (repeatable)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message "
                   "through the checkpoint's chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system "
                   "message first")
    cli.add_model(p)
    p.add_argument("--verbose", action="store_true", help="report load time, time to first "
                   "token and tokens/s on stderr")
    return p


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    devices.prepare(args.mesh)  # before JAX starts
    return cli.run(lambda: generate(args))


def generate(args) -> None:
    from mistral_jax.generation import generate as complete

    start = time.perf_counter()
    model = cli.load_model(args)
    loaded = time.perf_counter()
    kwargs = dict(cli.sampling(args), stop=args.stop, stream=True)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages = [*system, {"role": "user", "content": args.prompt}]
        pieces = complete(model, messages=messages, **kwargs)
    else:
        if args.system:
            raise ValueError("--system goes with --chat")
        pieces = complete(model, args.prompt, **kwargs)
        print(args.prompt, end="", flush=True)
    first = None
    for piece in pieces:
        first = first or time.perf_counter()
        print(piece, end="", flush=True)
    print()
    if args.verbose:
        end = time.perf_counter()
        first = first or end
        n = pieces.tokens
        rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
        print(f"loaded in {loaded - start:.2f} s; first token {first - loaded:.2f} s after "
              f"(compilation included); {n} tokens, {rate:.1f} tokens/s after the first",
              file=sys.stderr)
