"""`python bench/long.py`: attention at real lengths, ours against transformers' sdpa, every
figure in a process of its own (time and peak RSS are that process's alone):

- the train step (forward, backward, AdamW) of the benchmark Mistral (`bench/train.py`'s
  20.3M-parameter config, batch 1) at 2k, 8k and 16k tokens, with no window and with a window of
  512; transformers runs with a 20 GiB address-space limit, so a length it cannot hold ends in
  "out of memory" rather than taking the machine down;
- our step at 32k tokens with a window of 512 (`--remat dots`: in the scan over layers, the
  matmul outputs kept and the rest recomputed);
- the 256-token step of `bench/train.py` (batch 8) with the default attention (`auto`: the
  materialized scores, as the sequence fits in one query block) and with blockwise forced,
  against the materialized scores the benchmark ran before blockwise existed;
- prefill of a 16k-token prompt with a 1k window: our chunked prefill into the rolling cache
  against transformers' forward with `use_cache=True`.

    python bench/long.py [--json out.json] [--quick]

`--quick` leaves out the train step at 16k and 32k.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THEIR_MEMORY_LIMIT = 20 << 30  # bytes of address space for a transformers process


def step(seq: int, window: int | None, side: str, *extra: str, batch: int = 1,
         repeats: int = 2) -> dict:
    """One bench/train.py run of `side` alone: its figures, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(ROOT / "bench" / "train.py"), "--seq", str(seq), "--batch",
               str(batch), "--repeats", str(repeats), "--warmup", "1", "--only", side,
               "--json", str(out), *extra]
        if window is not None:
            cmd += ["--window", str(window)]
        limit = None
        if side == "transformers":
            def limit():
                resource.setrlimit(resource.RLIMIT_AS, (THEIR_MEMORY_LIMIT, THEIR_MEMORY_LIMIT))
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit)
        name = f"{side} {seq} window {window} {' '.join(extra)}".strip()
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            oom = "memory" in tail.lower() or proc.returncode in (-9, 137)
            return {"error": "out of memory" if oom else tail[:200]}
        r = json.loads(out.read_text())
    key = "ours" if side == "ours" else "theirs"
    return {"seconds": r[f"{key}_s"], "peak_rss_bytes": r["peak_rss_bytes"]}


PREFILL = """
import dataclasses, json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
side, length, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from bench import train as B
config = dataclasses.replace(B.CONFIG, sliding_window=window, max_position_embeddings=length)
ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, length))
if side == "ours":
    import mistral_jax
    model = mistral_jax.init(config, seed=0)
    run = lambda: mistral_jax.generate_tokens(model, ids, max_new_tokens=1)
else:
    import torch, transformers
    from mistral_jax.arch import configs
    torch.set_num_threads(2)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        **configs.to_hf_dict(config))).eval()
    t = torch.tensor(ids)
    def run():
        with torch.no_grad():
            hf(t, use_cache=True)
run()
times = []
for _ in range(2):
    start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
print(json.dumps({{"seconds": min(times),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def prefill(side: str, length: int, window: int) -> dict:
    limit = None
    if side == "transformers":
        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (THEIR_MEMORY_LIMIT, THEIR_MEMORY_LIMIT))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PREFILL.format(root=str(ROOT)), side,
                           str(length), str(window)], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=limit)
    print(f"[prefill {side} {length}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": "out of memory" if "memory" in tail.lower() else tail[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(ours: dict, theirs: dict, key: str = "seconds") -> float | None:
    if "error" in ours or "error" in theirs:
        return None
    return theirs[key] / ours[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="2k and 8k only")
    args = parser.parse_args()
    lengths = (2048, 8192) if args.quick else (2048, 8192, 16384)
    result: dict = {"train": [], "lengths": lengths}
    for seq in lengths:
        for window in (None, 512):
            ours, theirs = step(seq, window, "ours"), step(seq, window, "transformers")
            row = {"seq": seq, "window": window, "ours": ours, "transformers": theirs,
                   "speedup": ratio(ours, theirs)}
            if "error" not in ours and "error" not in theirs:
                row["rss_ratio"] = ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]
            result["train"].append(row)
            print(json.dumps(row), flush=True)
    if not args.quick:
        result["train_32k"] = step(32768, 512, "ours", "--remat", "dots", "--unroll", "1",
                                   repeats=1)
        print(json.dumps({"32k": result["train_32k"]}), flush=True)
    short = {impl: step(256, None, "ours", "--attention", impl, batch=8, repeats=5)
             for impl in ("auto", "xla", "blockwise")}
    result["short"] = {**short, "speedup": ratio(short["auto"], short["xla"]),
                       "blockwise_speedup": ratio(short["blockwise"], short["xla"])}
    print(json.dumps({"256": result["short"]}), flush=True)
    length = 16384
    ours, theirs = prefill("ours", length, 1024), prefill("transformers", length, 1024)
    result["prefill"] = {"tokens": length, "window": 1024, "ours": ours, "transformers": theirs,
                         "speedup": ratio(ours, theirs)}
    print(json.dumps({"prefill": result["prefill"]}), flush=True)
    rss = {r["seq"]: r["ours"]["peak_rss_bytes"] for r in result["train"]
           if r["window"] is None and "error" not in r["ours"]}
    seqs = sorted(rss)
    slopes = [(rss[b] - rss[a]) / (b - a) * 1024 for a, b in zip(seqs, seqs[1:], strict=False)]
    result["rss_slopes_bytes_per_1k_tokens"] = slopes
    if len(slopes) == 2:
        result["rss_slope_ratio"] = slopes[1] / slopes[0]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
