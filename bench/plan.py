"""The table of docs/plan.md: Mistral-7B's train step at 4k tokens a row, full fine-tune and LoRA
rank 16, compiled by `python -m train.plan` for TPU slices (libtpu's compile-only client, on
this CPU), each run as a user types it; writes bench/results/plan.md (after every row, so a
stopped run keeps what it has) and prints it.

    .venv/bin/python bench/plan.py            # every row (2 to 3 minutes a row on 2 cores)

Each row is one command: bfloat16 compute, remat full, one 4096-token row per data-parallel
replica (D x F rows). On each slice three meshes, DxFxT: tensor parallel only (T the most the
model splits: 8 on v5e-8, 4 on v5p-8; 32 on v5e-64, Mistral-7B's 32 heads, so the slice's other
factor 2 is data parallel), fully sharded data parallel only (1xNx1), and both (F x a small T).
The 64-chip slice is v5e-64: 16 GB chips, where the mesh decides whether the model fits
(v5p's 95 GB chips hold a full fine-tune on 4 of them already).
"""

from __future__ import annotations

import datetime
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mistral-7b"
# slice -> (tensor parallel only, FSDP only, both)
SLICES = {"v5e-8": ["1x1x8", "1x8x1", "1x2x4"], "v5p-8": ["1x1x4", "1x4x1", "1x2x2"],
          "v5e-64": ["2x1x32", "1x64x1", "1x16x4"]}
MODES = {"full": [], "LoRA r16": ["--lora-rank", "16"]}
HEAD = ["| mode | topology | mesh (DxFxT) | batch | inputs / device | temporaries / device "
        "| needed / device | verdict | step (est.) |", "|---|---|---|---|---|---|---|---|---|"]


def rows(mesh: str) -> int:
    """The batch: one row per data-parallel replica, D x F ("DxT" or "DxFxT")."""
    *replicas, _ = map(int, mesh.split("x"))
    return math.prod(replicas)


def command(topology: str, mesh: str, mode: str) -> list[str]:
    return ["python", "-m", "train.plan", "--model", MODEL, "--topology", topology,
            "--mesh", mesh, "--batch-size", str(rows(mesh)), "--seq-len", "4096", "--dtype",
            "bfloat16", "--remat", "full", *MODES[mode]]


def _bytes(line: str) -> str:
    """The human-readable size on an `arguments`/`temporaries`/`needed` line."""
    return re.search(r"([\d.]+ (?:GiB|MiB|KiB|B))\s+\(", line).group(1)


def row(topology: str, mesh: str, mode: str) -> str:
    argv = command(topology, mesh, mode)
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                          cwd=ROOT)
    first = f"| {mode} | {topology} | {mesh} | {rows(mesh)} |"
    if done.returncode:
        return f"{first} error: {done.stderr.strip()[-120:]} | | | | |"
    out = done.stdout.splitlines()
    said = {line.split()[0]: line for line in out if line.startswith("  ")}
    step = next((re.search(r"([\d.]+ s)", line).group(1) for line in out
                 if line.startswith("step time")), "")
    verdict = out[-1].split(":")[0]
    if "arguments" in said:
        return (f"{first} {_bytes(said['arguments'])} | {_bytes(said['temporaries'])} | "
                f"{_bytes(said['needed'])} | {verdict} | {step} |")
    # the TPU compiler refused the program: the inputs from the shapes, its own words on the rest
    inputs = next(line for line in out if line.startswith("per device:"))
    arguments = re.search(r"([\d.]+ [GMK]?i?B) in all", inputs).group(1)
    used = re.search(r"[Uu]sed ([\d.]+\s*[GMK]) of ([\d.]+\s*[GMK])", out[-1])
    needed = f"refused (used {used.group(1)} of {used.group(2)})" if used else "refused"
    return f"{first} {arguments} | | {needed} | {verdict} | {step} |"


def main() -> None:
    started = datetime.date.today().isoformat()
    lines = [f"Machine: {platform.processor() or platform.machine()}, Python "
             f"{platform.python_version()}, {started}; each row: "
             "`python -m train.plan --model mistral-7b --topology T --mesh DxFxT "
             "--batch-size B --seq-len 4096 --dtype bfloat16 --remat full [--lora-rank 16]` "
             "(B = D x F: one row per data-parallel replica). Step time: an estimate at 40% "
             "MFU. Temporaries: activations, gradients, workspace (XLA's memory analysis).", "",
             *HEAD]
    out = ROOT / "bench" / "results" / "plan.md"
    for mode in MODES:
        for topology, meshes in SLICES.items():
            for mesh in meshes:
                start = time.perf_counter()
                try:
                    lines.append(row(topology, mesh, mode))
                except Exception as e:  # an output this script does not read: keep the rest
                    lines.append(f"| {mode} | {topology} | {mesh} | {rows(mesh)} | "
                                 f"unread: {e!r} | | | | |")
                print(f"{lines[-1]}  ({time.perf_counter() - start:.0f} s)", flush=True)
                out.write_text("\n".join(lines) + "\n")
    text = "\n".join(lines) + "\n"
    print(f"\n{text}wrote {out}")


if __name__ == "__main__":
    main()
