"""The Markdown pages (README.md, CHANGELOG.md, docs/*.md) read as rendered. Their code
fences pair up as a Markdown renderer pairs them: every block opens with a language and closes
with a bare fence, and nothing that belongs to the prose (a heading, a table) lands inside a
block, nor a command line outside one.

A fence closed one line early is the failure this catches: the commands after it render as
prose, and the bare fence meant to close the block opens a new one that swallows what follows
(a table, the next `## ` heading) up to the next fence.

And what a page points at is there: README's Documentation section lists every docs page,
every relative link reaches a file (and its `#anchor` a heading of it), and every repository
path a page names in backticks exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a path in backticks under one of the repository's top folders; words in capitals are
# placeholders (`runs/finetune-DATE-TIME/`), and `{a,b}` or `*` patterns are not paths
PATH = re.compile(r"`((?:mistral_jax|convert|train|bench|tests|scripts|docs)/[\w./-]*)`")
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


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_fence_opens_with_a_language_and_closes(page):
    problems = fence_problems(page.read_text())
    assert not problems, f"{page.name}'s code fences:\n" + "\n".join(problems)


def anchors(page: Path) -> set[str]:
    """The anchors a renderer gives the headings of `page` (GitHub's rule: lower case, spaces
    to hyphens, punctuation other than hyphens and underscores dropped)."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.*)$", page.read_text(), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_paths_reach_what_they_name(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"\w+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name} links {target}: no such file"
        if anchor:
            assert anchor in anchors(linked), f"{page.name} links {target}: no such heading"
    for path in PATH.findall(text) if page.name != "CHANGELOG.md" else ():  # it names old ones
        if re.search(r"[A-Z]{2,}|[*{]", path):
            continue
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


def test_readme_lists_every_docs_page():
    listed = README.read_text().split("\n## Documentation\n")[1].split("\n## ")[0]
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", listed))
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages and pages == linked


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
