"""Chat with the checkpoint CKPT in the terminal, through its chat template: each reply streams
as it is generated, and the conversation so far is the prompt of the next turn.

    python -m mistral_jax.chat ckpt/ --system "You are terse."

Type a message and Enter. /reset starts the conversation again (the system message kept);
/exit or Ctrl-D ends; Ctrl-C stops a reply early.
"""

from __future__ import annotations

import sys

from mistral_jax import cli, devices


def arguments():
    p = cli.parser("python -m mistral_jax.chat", __doc__)
    p.add_argument("ckpt", help="checkpoint directory, with a tokenizer (and a chat template)")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message first")
    cli.add_sampling(p, max_new_tokens=256)
    cli.add_model(p)
    return p


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    devices.prepare(args.mesh)  # before JAX starts
    return cli.run(lambda: chat(args))


def chat(args) -> None:
    from mistral_jax.generation import generate

    model = cli.load_model(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages, prompt = list(start), "> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt
            print()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = list(start)
            print("(conversation reset" + (": the system message kept)" if start else ")"),
                  flush=True)
            continue
        if not line.strip():
            continue
        turn = [*messages, {"role": "user", "content": line}]
        reply = ""
        try:
            for piece in generate(model, messages=turn, stream=True, **cli.sampling(args)):
                print(piece, end="", flush=True)
                reply += piece
        except KeyboardInterrupt:  # the reply so far stays in the conversation
            pass
        except ValueError as e:  # too long for the model, the template refuses, ...
            print(f"error: {e} (/reset starts again)", file=sys.stderr)
            continue
        print()
        messages = [*turn, {"role": "assistant", "content": reply}]
