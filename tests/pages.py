"""What README.md and the docs pages show, read as a user reads them, for the tests that run it
(test_readme.py, test_readme_path.py): the pages in order, their fenced blocks under their
headings, a bash block's command lines, and running one as written from a working directory
(a user's environment, the flags that shorten the work appended)."""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# README's section that takes a real model through chat SFT, DPO and serving: run on its own
# (test_readme_path.py), not in the sequence of the other pages' commands
WHOLE_PATH = "A chat model of your own, end to end"
PYTHONS = ("python", ".venv/bin/python")
NEW_TOKENS = 8
# appended to shorten a command: argparse takes the last of a repeated flag
SHORTEN = {**dict.fromkeys(("train.finetune", "train.dpo"), ["--steps", "3", "--seq-len", "64",
           "--batch-size", "8", "--eval-every", "3", "--save-every", "3", "--eval-batches", "1"]),
           "mistral_jax.generate": ["--max-new-tokens", str(NEW_TOKENS)]}
# a command matching the pattern is not run here, for the reason given
SKIPPED = {
    r"-m pytest": "the suite running this test",
    r"^pip install": "scripts/setup.sh installed the extras already",
    r"bench/run\.py": "every CPU benchmark, about 12 minutes (the figures in docs/benchmarks.md)",
    r"bench/gpu\.sh": "needs an NVIDIA GPU",
    r"bench/plan\.py": "compiles Mistral-7B's step 18 times, about 45 minutes on 2 cores (its "
                        "table is on the page)",
    r"convert\.from_torch (path/to/Mistral-7B-v0\.1/|mistralai/|mistral-7B-v0\.1/)":
        "Mistral-7B is a 14 GB download; tests/test_convert_streaming.py and "
        "tests/test_mistral_original.py convert small checkpoints of these formats",
    r"convert\.from_torch \S+\.gguf": "a GGUF download; tests/test_gguf.py converts small ones",
    r"convert\.from_torch (megatron_lm_345m|checkpoints/gpt2-345m|model_optim_rng\.pt)":
        "a Megatron-LM checkpoint from NGC; tests/test_megatron.py converts small ones",
}


def pages() -> list[Path]:
    """README, then the docs pages in the order its Documentation section lists them."""
    listed = README.read_text().split("\n## Documentation\n")[1].split("\n## ")[0]
    return [README, *(ROOT / p for p in re.findall(r"\]\((docs/[\w-]+\.md)\)", listed))]


def name(page: Path) -> str:  # docs/serving.md
    return page.relative_to(ROOT).as_posix()


def section(page: Path, heading: str) -> str:
    """Which test runs the blocks under `heading` of `page`: "serving" (a live server),
    "path" (README's whole path on a real model) or "pages" (the rest, in sequence)."""
    if page.name == "serving.md" or (page == README and heading == "Serve"):
        return "serving"
    return "path" if page == README and heading == WHOLE_PATH else "pages"


def blocks(page: Path) -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block of `page`, in order."""
    found, heading = [], ""
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        if m := re.match(r"#+ (.*)", lines[i]):
            heading = m.group(1).strip()
        elif m := re.match(r"```(\w+)", lines[i]):
            end = lines.index("```", i + 1)
            found.append((heading, m.group(1), "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return found




def commands(code: str) -> list[list[str]]:
    """The command lines of a bash block as argv lists (continuations joined, comments cut,
    `a && b` taken as its last command)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while "&&" in argv:
            argv = argv[argv.index("&&") + 1:]
        if argv:
            out.append(argv)
    return out


def skip_reason(line: str) -> str | None:
    return next((why for pattern, why in SKIPPED.items() if re.search(pattern, line)), None)


def user_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user's shell


def run(argv: list[str], cwd: Path, shorten: dict = SHORTEN) -> subprocess.CompletedProcess:
    assert argv[0] in PYTHONS and argv[1] == "-m", f"a page runs {argv[0]} directly: {argv}"
    module = argv[2]
    args = []
    for a in argv[3:]:
        matches = sorted(glob.glob(a, root_dir=cwd)) if "*" in a else [a]
        assert matches, f"{a} matches nothing in {cwd}"
        args += matches
    proc = subprocess.run([sys.executable, "-m", module, *args, *shorten.get(module, [])],
                          cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n" \
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc




def wait_for_health(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, \
                server.stdout.read() if server.poll() is not None else "no /health in 180 s"
            time.sleep(1)


