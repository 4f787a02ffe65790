"""`python bench/lexicon.py CKPT [CKPT ...]`: how far README's post-training path moved a model
towards the Devil's Lexicographer. For each checkpoint, the share of the held-out questions
(`train/corpus/lexicon_chat_val.jsonl`: each conversation's first question, after its system
message where it has one) whose greedy answer is one dictionary entry (`WORD, n. ...`), and
the mean length of the answers in words; the first answers are printed beside each other.

    .venv/bin/python bench/lexicon.py smollm2/ lexicon-sft-merged/ lexicon/ [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mistral_jax  # noqa: E402

HELD_OUT = ROOT / "train" / "corpus" / "lexicon_chat_val.jsonl"
ENTRY = re.compile(r"^[A-Z][A-Z' -]+, (n|v|v\.t|v\.i|adj|adv)\. \S")  # the sets' entry form


def questions() -> list[list[dict]]:
    """Each held-out conversation up to its first user turn (a system message kept)."""
    out = []
    for line in HELD_OUT.read_text().splitlines():
        messages = json.loads(line)["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        out.append(messages[:first + 1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpts", nargs="+", help="checkpoint directories")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    asked = questions()
    answers = {}
    for ckpt in args.ckpts:
        model = mistral_jax.load(ckpt)
        answers[ckpt] = [mistral_jax.generate(model, messages=q, max_new_tokens=args.max_new_tokens)
                         for q in asked]
        entries = sum(bool(ENTRY.match(a.strip())) for a in answers[ckpt])
        words = sum(len(a.split()) for a in answers[ckpt]) / len(asked)
        print(f"{ckpt}: {entries}/{len(asked)} answers are entries, {words:.1f} words on average")
    for i in range(3):
        print(f"\n{asked[i][-1]['content']}")
        for ckpt in args.ckpts:
            print(f"  {ckpt}: {answers[ckpt][i]}")


if __name__ == "__main__":
    main()
