"""The table of docs/plan.md: Mistral-7B's train step at 4k tokens a row, full fine-tune and LoRA
rank 16, compiled by `python -m train.plan` for TPU slices (libtpu's compile-only client, on
this CPU), each run as a user types it; writes bench/results/plan.md and prints it.

    .venv/bin/python bench/plan.py            # every row (a few minutes on 2 cores)

Each row is one command: bfloat16 compute, remat full, one 4096-token row per data-parallel
replica. The meshes are tensor parallel only (1xT, T the largest the model splits: 8), data
parallel only (Nx1) and both on the 64-chip slice (8x8).
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLICES = {"v5e-8": ["1x8", "8x1"], "v5p-8": ["1x4", "4x1"], "v5e-64": ["8x8", "64x1"]}
MODES = {"full": [], "LoRA r16": ["--lora-rank", "16"]}


def command(topology: str, mesh: str, mode: str) -> list[str]:
    data = int(mesh.split("x")[0])
    return ["python", "-m", "train.plan", "--model", "mistral-7b", "--topology", topology,
            "--mesh", mesh, "--batch-size", str(data), "--seq-len", "4096", "--dtype",
            "bfloat16", "--remat", "full", *MODES[mode]]


def row(topology: str, mesh: str, mode: str) -> str:
    argv = command(topology, mesh, mode)
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode:
        return f"| {mode} | {topology} | {mesh} | error: {done.stderr.strip()[-120:]} | | | |"
    out = done.stdout.splitlines()
    inputs = next(line for line in out if line.strip().startswith(("arguments", "per device:")))
    arguments = re.search(r"([\d.]+ [GMK]iB)", inputs.split("(")[0] if "bytes" in inputs
                          else inputs.split("(inputs;")[1]).group(1)
    needed = next((line.split()[3] + " " + line.split()[4] for line in out
                   if line.strip().startswith("needed")), "over (refused)")
    step = next((re.search(r"([\d.]+ s)", line).group(1) for line in out
                 if line.startswith("step time")), "")
    verdict = out[-1].split(":")[0]
    return f"| {mode} | {topology} | {mesh} | {arguments} | {needed} | {verdict} | {step} |"


def main() -> None:
    lines = [f"Machine: {platform.processor() or platform.machine()}, Python "
             f"{platform.python_version()}; each row: "
             "`python -m train.plan --model mistral-7b --topology T --mesh M --batch-size D "
             "--seq-len 4096 --dtype bfloat16 --remat full [--lora-rank 16]` (D: the mesh's "
             "data axis). Step time: an estimate at 40% MFU.", "",
             "| mode | topology | mesh | inputs / device | needed / device | verdict | step |",
             "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        for topology, meshes in SLICES.items():
            for mesh in meshes:
                lines.append(row(topology, mesh, mode))
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results" / "plan.md"
    out.write_text(text)
    print(f"\n{text}wrote {out}")


if __name__ == "__main__":
    main()
