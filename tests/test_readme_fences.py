"""README.md's code fences pair up as a Markdown renderer pairs them: every block opens with a
language and closes with a bare fence, and nothing that belongs to the prose (a heading, a
table) lands inside a block, nor a command line outside one.

A fence closed one line early is the failure this catches: the commands after it render as
prose, and the bare fence meant to close the block opens a new one that swallows what follows
(a table, the next `## ` heading) up to the next fence."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
HEADING = re.compile(r"^#{2,6} \S")  # bash comments are "# ", Markdown sections "## " and deeper
TABLE_ROW = re.compile(r"^\|.*\|\s*$")
COMMAND = re.compile(r"^(python|\.venv/bin/python|pip|bash|curl) ")  # a shell line in the prose


def fence_problems(text: str) -> list[str]:
    """What is wrong with the fences of the Markdown `text`, one message per problem (with
    its line number); empty when every block opens with a language and closes properly."""
    problems = []
    opened = None  # (line number, fence, language) of the block we are in
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if opened is None:
            if fence:
                marker, info = fence.group(1), fence.group(2).strip()
                if not info:
                    problems.append(f"line {number}: a bare fence opens a block (a closing "
                                    "fence with no block open: the block above closed early?)")
                opened = (number, marker, info)
            elif COMMAND.match(line):
                problems.append(f"line {number}: a command outside any code block: {line!r}")
            continue
        start, marker, info = opened
        if fence and fence.group(1)[0] == marker[0] and len(fence.group(1)) >= len(marker):
            if not fence.group(2).strip():
                opened = None
            else:  # a renderer takes it as the block's text, not as its end
                problems.append(f"line {number}: a fence with a language inside the block "
                                f"opened on line {start} (that block is not closed)")
        elif HEADING.match(line):
            problems.append(f"line {number}: heading {line!r} inside the block opened on line "
                            f"{start}")
        elif TABLE_ROW.match(line):
            problems.append(f"line {number}: a table row inside the block opened on line "
                            f"{start}")
    if opened is not None:
        problems.append(f"line {opened[0]}: a block that never closes")
    return problems


def test_every_readme_fence_opens_with_a_language_and_closes():
    problems = fence_problems(README.read_text())
    assert not problems, "README.md's code fences:\n" + "\n".join(problems)


BROKEN = """\
```bash
# Hugging Face folders
python -m convert.from_torch path/to/hf-folder ckpt/
```
# GGUF
python -m convert.from_torch model.gguf ckpt/ --quantize int8
python -m convert.to_torch ckpt/ hf-out/
```

| format | what is read |
|---|---|
| GGUF | llama |

## Benchmarks

```bash
python bench/run.py
```
"""


def test_the_check_finds_a_fence_closed_early():
    """What README's Converters section was: the check names each line that goes wrong."""
    problems = fence_problems(BROKEN)
    assert [p.split(":")[0] for p in problems] == [
        "line 6", "line 7", "line 8", "line 10", "line 11", "line 12", "line 14",
        "line 16"], problems
    assert "a command outside any code block" in problems[0]
    assert "a bare fence opens a block" in problems[2]
    assert "heading '## Benchmarks' inside the block opened on line 8" in problems[6]
    fixed = BROKEN.replace("ckpt/\n```\n# GGUF", "ckpt/\n# GGUF")
    assert fence_problems(fixed) == []
