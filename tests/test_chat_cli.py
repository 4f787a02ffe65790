"""`python -m mistral_jax.chat` driven through its stdin as a user types: each reply equals
generate() on the conversation so far (with the sampling flags generate takes); /reset starts
again and says so; /exit and Ctrl-D (stdin closed) end it with exit code 0."""

import os
import re
import subprocess
import sys

import mistral_jax


def run_chat(ckpt, stdin, *flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "mistral_jax.chat", ckpt.name, "--system",
                           "Be brief.", "--max-new-tokens", "8", *flags], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=ckpt.parent)


def test_turns_reset_and_exit(tiny_ckpt, tiny_model):
    system = {"role": "system", "content": "Be brief."}

    def reply(*turns):
        messages = [system]
        for i, turn in enumerate(turns):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn})
        return mistral_jax.generate(tiny_model, messages=messages, max_new_tokens=8)

    first = reply("Hi")
    second = reply("Hi", first, "And salt?")
    fresh = reply("And salt?")
    done = run_chat(tiny_ckpt, "Hi\nAnd salt?\n/reset\nAnd salt?\n/exit\nnever read\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == \
        f"{first}\n{second}\n(conversation reset: the system message kept)\n{fresh}\n"
    # before the prompt: what it compiles, each with its time (the decode step at one width)
    assert re.search(r"\(1/\d+\) decode step, 1 row: [\d.]+ s\n", done.stderr), done.stderr
    assert re.search(r"compiled in [\d.]+ s", done.stderr)
    closed = run_chat(tiny_ckpt, "Hi\n")  # then Ctrl-D
    assert closed.returncode == 0, closed.stderr
    assert closed.stdout == f"{first}\n\n"


def test_repetition_penalty_reaches_the_reply(tiny_ckpt, tiny_model):
    """--repetition-penalty (one of the sampling flags the chat shares with generate) gives
    generate()'s reply with the same repetition_penalty, not the plain greedy one."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = mistral_jax.generate(tiny_model, messages=messages, max_new_tokens=24,
                                    repetition_penalty=1.5)
    assert expected != mistral_jax.generate(tiny_model, messages=messages, max_new_tokens=24)
    done = run_chat(tiny_ckpt, "Hi\n", "--max-new-tokens", "24", "--repetition-penalty", "1.5")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{expected}\n\n"


def test_verbose_says_each_replys_rate(tiny_ckpt, tiny_model):
    """Each reply's line counts its tokens (EOS not counted), as a stream of generate() does."""
    counts, messages = [], [{"role": "system", "content": "Be brief."}]
    for turn in ("Hi", "And salt?"):
        messages.append({"role": "user", "content": turn})
        stream = mistral_jax.generate(tiny_model, messages=messages, max_new_tokens=6,
                                      stream=True)
        messages.append({"role": "assistant", "content": "".join(stream)})
        counts.append(stream.tokens)
    done = run_chat(tiny_ckpt, "Hi\nAnd salt?\n", "--verbose", "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    rates = re.findall(r"(\d+) tokens, ([\d.]+) tokens/s after the first; first token "
                       r"([\d.]+) s after the message", done.stderr)
    assert [int(n) for n, _, _ in rates] == counts, done.stderr
