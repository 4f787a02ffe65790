"""Chat with the checkpoint CKPT in the terminal, through its chat template: each reply streams
as it is generated, and the conversation so far is the prompt of the next turn.

    python -m mistral_jax.chat ckpt/ --system "You are terse."

Type a message and Enter. /reset starts the conversation again (the system message kept);
/exit or Ctrl-D ends; Ctrl-C stops a reply early. The replies run on the serving engine (one
slot), compiled before the first prompt: every turn's steps are those compiled then, however
long the conversation grows (up to --max-len tokens).
"""

from __future__ import annotations

import sys
import time

from mistral_jax import cli


def arguments():
    p = cli.parser("python -m mistral_jax.chat", __doc__)
    p.add_argument("ckpt", help="checkpoint directory, with a tokenizer (and a chat template)")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message first")
    cli.add_sampling(p, max_new_tokens=256)
    p.add_argument("--max-len", type=int, default=None, help="most tokens of the conversation, "
                   "replies included (default: the model's positions, at most 4096)")
    cli.add_model(p)
    p.add_argument("--verbose", action="store_true", help="after each reply, its time to first "
                   "token and tokens/s on stderr")
    return p


def main(argv=None) -> int:
    return cli.entry(arguments(), chat, argv)


def chat(args) -> None:
    from mistral_jax.cli import progress
    from mistral_jax.serving.engine import Engine
    from mistral_jax.text.chat_template import encode_chat
    from mistral_jax.text.detokenize import CompletionText

    model = cli.load_model(args)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"{args.ckpt} has no tokenizer: a chat needs one (add tokenizer.json or "
                         "tokenizer.model to the checkpoint directory)")
    progress.build_kernel()
    sampling = cli.sampling(args)
    max_tokens = sampling.pop("max_new_tokens")
    engine = Engine(model, max_batch=1, max_len=args.max_len)
    progress.warm_up(engine)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages, prompt = list(start), "> " if sys.stdin.isatty() else ""
    with engine:
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
            try:
                ids = encode_chat(tokenizer, turn)
                asked = time.perf_counter()
                request = engine.submit(ids, max_tokens=max_tokens, **sampling)
            except ValueError as e:  # too long for the engine, the template refuses, ...
                print(f"error: {e} (/reset starts again)", file=sys.stderr)
                continue
            text, times = CompletionText(tokenizer, ids), []
            try:
                for event in request:
                    times.append(time.perf_counter())
                    print(text.push(event.token), end="", flush=True)
            except KeyboardInterrupt:  # the reply so far stays in the conversation
                request.cancel()
            print(text.flush())
            messages = [*turn, {"role": "assistant", "content": text.text}]
            if args.verbose and times:
                rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
                progress.say(f"{len(times)} tokens, {rate:.1f} tokens/s after the first; "
                             f"first token {times[0] - asked:.2f} s after the message")
