"""Stream a completion of PROMPT from the checkpoint CKPT to stdout.

    python -m mistral_jax.generate ckpt/ "My favourite condiment is" --max-new-tokens 40
    python -m mistral_jax.generate ckpt/ "Hello!" --chat --mesh 1x8 --verbose
    python -m mistral_jax.generate base/ "LAWYER, n." --adapters run/adapters
"""

from __future__ import annotations

import time

from mistral_jax import cli


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
    return cli.entry(arguments(), generate, argv)


def generate(args) -> None:
    from mistral_jax.cli import progress
    from mistral_jax.inference.generation import generate as complete

    progress.watch_compilation()
    start = time.perf_counter()
    model = cli.load_model(args)
    loaded = time.perf_counter()
    built = progress.build_kernel()
    kwargs = dict(cli.sampling(args), stop=args.stop, stream=True)
    compiled = progress.compile_seconds()
    asked = time.perf_counter()
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages = [*system, {"role": "user", "content": args.prompt}]
        pieces = complete(model, messages=messages, **kwargs)
    else:
        if args.system:
            raise ValueError("--system goes with --chat")
        pieces = complete(model, args.prompt, **kwargs)
        print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    if args.verbose:
        times, n = pieces.times, pieces.tokens
        compiling = progress.compile_seconds() - compiled  # (all before the first token)
        first = f"{times[0] - asked - compiling:.2f} s" if times else "none"
        rate = f"{(n - 1) / (times[-1] - times[0]):.1f}" if n > 1 else "-"
        progress.say(f"loaded in {loaded - start:.2f} s; one-time work {built + compiling:.2f} "
                     f"s (compiling {compiling:.2f} s, the CPU kernel's build {built:.2f} s); "
                     f"first token {first} after the prompt, one-time work not counted; {n} "
                     f"tokens, {rate} tokens/s after the first")
