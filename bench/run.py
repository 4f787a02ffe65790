"""Every benchmark, one command: `.venv/bin/python bench/run.py [--quick] [--out bench/results]`.

Each benchmark runs in its own process (so one's threads and memory do not colour another's) and
measures its baseline in the same run: the training step and decoding against transformers +
torch, MFU against a jitted matmul, MBU against a copy, conversion memory against the largest
tensor, and the paths a user runs (bench/paths.py) against llama.cpp too. Writes
OUT/results.json, OUT/results.md (the table README carries) and OUT/results.png.
`--quick` leaves out the conversion benchmark (it writes 13 GB to a temporary directory) and keeps
its figures from the last full run (OUT/convert.json), marked as such in the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Targets on a 2-core CPU: (what, result key path, target, "min" | "max")
TARGETS = [
    ("train step tokens/s, ours / transformers", ("train", "speedup"), 1.25, "min"),
    ("train step GEMM-relative MFU", ("train", "ours_mfu"), 0.75, "min"),
    ("a user's own jax.value_and_grad step, tokens/s / transformers", ("train", "user_speedup"),
     1.25, "min"),
    ("decode batch 1, ours / transformers (SmolLM2-135M)", ("smollm2", "decode1"), 3.0, "min"),
    ("decode batch 8, ours / transformers (SmolLM2-135M)", ("smollm2", "decode8"), 4.0, "min"),
    ("decode batch-1 MBU (SmolLM2-135M)", ("smollm2", "mbu_batch1"), 0.60, "min"),
    ("prefill 512 tokens, ours / transformers (SmolLM2-135M)", ("smollm2", "prefill"), 1.2,
     "min"),
    ("time to first token with compilation, s (SmolLM2-135M)", ("smollm2", "ttft"), 10.0, "max"),
    ("decode batch 1, ours / transformers (GPT-2 124M)", ("gpt2", "decode1"), 3.0, "min"),
    ("decode batch 8, ours / transformers (GPT-2 124M)", ("gpt2", "decode8"), 4.0, "min"),
    ("prefill 512 tokens, ours / transformers (GPT-2 124M)", ("gpt2", "prefill"), 1.2, "min"),
    ("conversion peak RSS (safetensors) / (1.5 x largest tensor + 1 GiB)",
     ("convert", "safetensors"), 1.0, "max"),
    # issue 13: attention at real lengths (bench/long.py, batch 1, each side in its process)
    ("train step 8k tokens, no window, ours / transformers", ("long", "8k"), 1.2, "min"),
    ("train step 8k tokens, no window, peak RSS ours / transformers", ("long", "8k_rss"), 1.0,
     "max"),
    ("train step 8k tokens, window 512, ours / transformers", ("long", "8k_w512"), 3.0, "min"),
    ("train step 32k tokens, window 512 (--remat dots), peak RSS GiB", ("long", "32k_rss_gib"),
     8.0, "max"),
    ("peak RSS slope 8k->16k over 2k->8k (1 = linear)", ("long", "rss_slope_ratio"), 1.25,
     "max"),
    ("prefill 16k tokens, window 1k, ours / transformers", ("long", "prefill"), 3.0, "min"),
    ("train step 256 tokens, default (auto) / materialized attention", ("long", "short"), 1.0,
     "min"),
    # serving (bench/serve.py: 32 requests arriving 4 at a time, SmolLM2-135M, 32 slots)
    ("serving throughput / the same requests one by one through generate()",
     ("serve", "vs_one_by_one"), 3.0, "min"),
    ("serving throughput / transformers generate in static batches of 8",
     ("serve", "vs_transformers"), 2.0, "min"),
    ("serving p99 time to first token under load, s", ("serve", "ttft_p99_s"), 2.0, "max"),
    ("int8 serving throughput / one by one", ("serve_int8", "vs_one_by_one"), 3.0, "min"),
    ("int8 serving throughput / transformers float32 static 8",
     ("serve_int8", "vs_transformers"), 2.0, "min"),
    ("int8 serving p99 time to first token under load, s", ("serve_int8", "ttft_p99_s"), 2.0,
     "max"),
    # issue 23: the paths a user runs (bench/paths.py, SmolLM2-135M, batch 1), and fine-tuning
    # as a user starts it (bench/finetune.py)
    *[(f"{p} {what}", ("paths", f"{key}_{p}"), target, "min")
      for p in ("float32", "bfloat16", "int8")
      for what, key, target in (
          ("generate(stream=True) / generate_tokens", "stream", 0.85),
          ("engine one request / generate_tokens", "engine", 0.85),
          ("chat / generate_tokens", "chat", 0.85),
          ("server one request (openai client) / generate_tokens", "server", 0.8),
          ("generate_tokens / llama.cpp at the same bytes", "loop_llama", 1.0),
          ("server one request / llama.cpp at the same bytes", "server_llama", 0.8))],
    ("LoRA fine-tuning, default mesh / --mesh 1x1 tokens/s", ("finetune", "lora"), 0.9, "min"),
    # reduced precision (bench/precision.py, bench/accuracy.py: SmolLM2-135M's Q4_1 GGUF)
    ("bfloat16 decode batch 1 / our float32", ("precision", "bf16_vs_f32"), 1.6, "min"),
    ("int8 decode batch 1 / our float32", ("precision", "int8_vs_f32"), 2.2, "min"),
    ("int8 decode batch 1 / transformers float32", ("precision", "int8_vs_hf"), 4.0, "min"),
    ("int8 decode batch 8 / transformers float32", ("precision", "int8_b8_vs_hf"), 3.0, "min"),
    ("int8 checkpoint / float32 on disk (GPT-2 124M, random weights)",
     ("precision", "disk_gpt2"), 0.30, "max"),
    ("int8 checkpoint / float32 on disk (SmolLM2 from Q4_1: its float32 compresses)",
     ("precision", "disk_smollm2"), 0.30, "max"),
    ("perplexity off transformers float32, bfloat16", ("accuracy", "bfloat16"), 0.01, "max"),
    ("perplexity off transformers float32, int8", ("accuracy", "int8"), 0.015, "max"),
    ("perplexity off transformers float32, int8 + int8 KV", ("accuracy", "int8+kv8"), 0.02,
     "max"),
    ("bfloat16 greedy tokens equal to float32's (8 prompts x 64)", ("accuracy", "greedy_bf16"),
     0.95, "min"),
]


# name: (script, its arguments)
BENCHES = {"train": ("train.py",), "decode": ("decode.py",), "long": ("long.py",),
           "serve": ("serve.py", "--intervals", "2,1,0.5"),
           "serve_int8": ("serve.py", "--precision", "int8", "--intervals", "2,1,0.5"),
           "paths": ("paths.py",), "finetune": ("finetune.py",),
           "precision": ("precision.py",), "accuracy": ("accuracy.py",),
           "convert": ("convert_rss.py",)}


def bench(script: str, out: Path, *args: str) -> dict:
    """Run bench/`script` with `--json out` in a fresh process; its figures."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "bench" / script), "--json", str(out), *args],
                   cwd=ROOT, check=True)
    print(f"[{script}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
    return json.loads(out.read_text())


def summary(raw: dict) -> dict:
    """The figures the targets name, flat: {section: {name: value}}."""
    out = {"train": raw["train"]} if "train" in raw else {}
    for m in raw.get("decode", {}).get("models", []):
        out[m["model"]] = {"decode1": m["decode"][0]["ratio"], "decode8": m["decode"][1]["ratio"],
                           "mbu_batch1": m["mbu_batch1"], "prefill": m["prefill"]["ratio"],
                           "ttft": m["ttft_with_compile_s"]}
    if "convert" in raw:
        c = raw["convert"]
        out["convert"] = {k: c[k]["peak_bytes"] / c[k]["target_bytes"] for k in ("safetensors",
                                                                                   "bin")}
    if "long" in raw:
        out["long"] = long_summary(raw["long"])
    if "precision" in raw:
        out["precision"] = precision_summary(raw["precision"])
    if "accuracy" in raw:
        a = raw["accuracy"]
        out["accuracy"] = {k: abs(a[k]["ppl_vs_transformers"]) for k in a
                           if "ppl_vs_transformers" in a[k]}
        out["accuracy"]["greedy_bf16"] = a["bfloat16"]["greedy_vs_float32"]
    for name in ("serve", "serve_int8"):
        if name in raw:
            r = raw[name]
            out[name] = {"vs_one_by_one": r["vs_one_by_one"],
                         "vs_transformers": r["vs_transformers"],
                         "ttft_p99_s": r["server"]["ttft_p99_s"]}
    if "paths" in raw:
        out["paths"] = paths_summary(raw["paths"])
    if "finetune" in raw:
        out["finetune"] = {"lora": raw["finetune"]["lora_default_vs_1x1"]}
    return out


def paths_summary(r: dict) -> dict:
    """Each path's rate over the loop's, and the loop's and the server's over llama.cpp's."""
    out = {}
    for precision, row in r["ours"].items():
        rate = {path: v["tokens_per_s"] for path, v in row.items()}
        for path in ("stream", "engine", "chat", "server"):
            if path in rate and "loop" in rate:
                out[f"{path}_{precision}"] = rate[path] / rate["loop"]
        llama = r["llama_cpp"].get(precision, {}).get("tokens_per_s")
        for path in ("loop", "server"):
            if llama and path in rate:
                out[f"{path}_llama_{precision}"] = rate[path] / llama
    return out


def precision_summary(r: dict) -> dict:
    ours, hf, disk = r["ours"], r["transformers"], r["disk_bytes"]
    b1 = lambda row: row["batch1_tokens_per_s"]  # noqa: E731
    return {"bf16_vs_f32": b1(ours["bfloat16"]) / b1(ours["float32"]),
            "int8_vs_f32": b1(ours["int8"]) / b1(ours["float32"]),
            "int8_vs_hf": b1(ours["int8"]) / b1(hf["float32"]),
            "int8_b8_vs_hf": ours["int8"]["batch8_tokens_per_s"]
            / hf["float32"]["batch8_tokens_per_s"],
            "disk_gpt2": disk["gpt2_random"]["int8"] / disk["gpt2_random"]["float32"],
            "disk_smollm2": disk["smollm2"]["int8"] / disk["smollm2"]["float32"]}


def precision_table(r: dict, accuracy: dict | None) -> str:
    """Decode tokens/s of each variant, MBU against its bytes, and its accuracy."""
    rows = ["", "| SmolLM2-135M decode | batch 1 tokens/s | batch 8 tokens/s | bytes read per "
            "token | MBU batch 1 | perplexity off transformers | greedy as float32's |",
            "|---|---|---|---|---|---|---|"]
    for name, row in r["ours"].items():
        acc = (accuracy or {}).get(name, {})
        off = f"{acc['ppl_vs_transformers']:+.2%}" if acc else ""
        greedy = f"{acc['greedy_vs_float32']:.1%}" if acc else ""
        rows.append(f"| ours {name} | {row['batch1_tokens_per_s']:.1f} | "
                    f"{row['batch8_tokens_per_s']:.0f} | {row['bytes_per_token'] / 1e6:.0f} MB "
                    f"| {100 * row['mbu_batch1']:.0f}% | {off} | {greedy} |")
    for name, row in r["transformers"].items():
        rows.append(f"| transformers {name} | {row['batch1_tokens_per_s']:.1f} | "
                    f"{row['batch8_tokens_per_s']:.0f} | | | | |")
    disk = r["disk_bytes"]
    rows += ["", "Checkpoints on disk: SmolLM2 " + ", ".join(
        f"{k} {v / 1e6:.0f} MB" for k, v in disk["smollm2"].items()) + "; GPT-2 124M (random) "
        + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in disk["gpt2_random"].items())
        + f". CPU kernel: {r['cpu_kernel']}; copy bandwidth {r['copy_bandwidth_GBps']:.1f} GB/s."]
    return "\n".join(rows)


def long_summary(r: dict) -> dict:
    rows = {(row["seq"], row["window"]): row for row in r["train"]}
    flat = {"8k": rows[8192, None]["speedup"], "8k_rss": rows[8192, None].get("rss_ratio"),
            "8k_w512": rows[8192, 512]["speedup"], "short": r["short"]["speedup"],
            "prefill": r["prefill"]["speedup"]}
    if "train_32k" in r and "error" not in r["train_32k"]:
        flat["32k_rss_gib"] = r["train_32k"]["peak_rss_bytes"] / 2**30
    if "rss_slope_ratio" in r:
        flat["rss_slope_ratio"] = r["rss_slope_ratio"]
    return {k: v for k, v in flat.items() if v is not None}


def table(raw: dict, flat: dict) -> str:
    rows = ["| benchmark | measured | target | |", "|---|---|---|---|"]
    for what, (section, key), target, kind in TARGETS:
        if section not in flat:
            continue
        if key not in flat[section]:  # not measured in this run (--quick), or it failed
            continue
        value = flat[section][key]
        met = value >= target if kind == "min" else value <= target
        fmt = (lambda v: f"{100 * v:.0f}%") if "MFU" in what or "MBU" in what else \
            (lambda v: f"{100 * v:.2f}%") if "perplexity" in what else (lambda v: f"{v:.2f}")
        rows.append(f"| {what} | {fmt(value)} | {'≥' if kind == 'min' else '≤'} {fmt(target)} "
                    f"| {'met' if met else 'missed'} |")
    lines = ["\n".join(rows), ""]
    if "train" in raw:
        t = raw["train"]
        lines.append(f"Train step: ours {t['ours_tokens_per_s']:.0f} tokens/s, transformers "
                     f"{t['theirs_tokens_per_s']:.0f}; float32 GEMM {t['gemm_gflops']:.0f} "
                     f"GFLOP/s; {t['threads']} threads.")
    d = raw.get("decode", {"models": []})
    for m in d["models"]:
        b1, b8 = m["decode"]
        lines.append(f"{m['model']} ({m['params'] / 1e6:.0f}M): decode batch 1 "
                     f"{b1['ours_tokens_per_s']:.1f} vs {b1['hf_tokens_per_s']:.1f} tokens/s, "
                     f"batch 8 {b8['ours_tokens_per_s']:.0f} vs {b8['hf_tokens_per_s']:.0f}; "
                     f"prefill {m['prefill']['ours_tokens_per_s']:.0f} vs "
                     f"{m['prefill']['hf_tokens_per_s']:.0f} tokens/s.")
        if "window_latency" in m:
            w = m["window_latency"]
            lines.append(f"{m['model']} with a 64-token window: ms per token at W / 4W / 16W "
                         + " / ".join(f"{r['ms_per_token']:.1f}" for r in w)
                         + f"; rolling cache {w[0]['cache_bytes'] / 2**20:.1f} MiB.")
    if "copy_bandwidth_GBps" in d:
        lines.append(f"Copy bandwidth (MBU's reference) {d['copy_bandwidth_GBps']:.1f} GB/s.")
    if "long" in raw:
        lines.append(long_table(raw["long"]))
    for name in ("serve", "serve_int8"):
        if name not in raw:
            continue
        r = raw[name]
        s = r["server"]
        lines.append(f"Serving ({r.get('precision', 'float32')}) {r['requests']} requests, "
                     f"{r['burst']} every {r['interval_s']:g} s: "
                     f"{s['tokens_per_s']:.1f} tokens/s, against "
                     f"{r['one_by_one']['tokens_per_s']:.1f} one by one through generate() and "
                     f"{r['transformers_static8']['tokens_per_s']:.1f} for transformers in "
                     f"batches of 8; time to first token p50 / p99 {s['ttft_p50_s']:.2f} / "
                     f"{s['ttft_p99_s']:.2f} s, per later token {1000 * s['per_token_p50_s']:.0f}"
                     f" / {1000 * s['per_token_p99_s']:.0f} ms.")
    if "paths" in raw:
        sys.path.insert(0, str(ROOT))
        from bench.paths import table as paths_table

        lines += ["", paths_table(raw["paths"])]
    if "finetune" in raw:
        f = raw["finetune"]
        lora, job = f["lora"], f["main_job"]
        lines.append(f"\nFine-tuning as a user starts it: LoRA on SmolLM2 "
                     f"{lora['default']['tokens_per_s']:.0f} tokens/s on the default mesh, "
                     f"{lora['1x1']['tokens_per_s']:.0f} on --mesh 1x1 (peak RSS "
                     f"{lora['default']['peak_rss_bytes'] / 2**30:.1f} / "
                     f"{lora['1x1']['peak_rss_bytes'] / 2**30:.1f} GiB); README's main job "
                     f"{job['1x8']['seconds']:.0f} s on --mesh 1x8, {job['1x1']['seconds']:.0f} "
                     "s on --mesh 1x1.")
    if "precision" in raw:
        lines.append(precision_table(raw["precision"], raw.get("accuracy")))
    if "convert" in raw:
        c = raw["convert"]
        lines.append(f"Conversion{' (from the last full run)' if c.get('earlier') else ''} of a "
                     f"{c['model_bytes'] / 2**30:.2f} GiB checkpoint (largest "
                     f"tensor {c['largest_tensor_bytes'] / 2**30:.3f} GiB): peak RSS "
                     f"{c['safetensors']['peak_bytes'] / 2**30:.2f} GiB from safetensors, "
                     f"{c['bin']['peak_bytes'] / 2**30:.2f} GiB from pytorch_model.bin.")
    return "\n".join(lines) + "\n"


def long_table(r: dict) -> str:
    """The train step at each length: seconds and peak RSS of both, the ratios."""
    gib = lambda side: f"{side['peak_rss_bytes'] / 2**30:.2f} GiB"
    cell = lambda side: side["error"] if "error" in side else \
        f"{side['seconds']:.2f} s, {gib(side)}"
    rows = ["", "| train step, batch 1 | window | ours | transformers | speed | RSS |",
            "|---|---|---|---|---|---|"]
    for row in r["train"]:
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        rss = f"{row['rss_ratio']:.2f}" if "rss_ratio" in row else "-"
        rows.append(f"| {row['seq']} tokens | {row['window'] or 'none'} | {cell(row['ours'])} | "
                    f"{cell(row['transformers'])} | {speed} | {rss} |")
    if "train_32k" in r:
        rows.append(f"| 32768 tokens (--remat dots) | 512 | {cell(r['train_32k'])} | | | |")
    p = r["prefill"]
    rows += ["", f"Prefill of {p['tokens']} tokens, window {p['window']}: ours "
             f"{cell(p['ours'])}, transformers {cell(p['transformers'])}."]
    s = r["short"]
    rows.append(f"256-token step (batch 8): auto {s['auto']['seconds']:.3f} s, blockwise "
                f"{s['blockwise']['seconds']:.3f} s, materialized {s['xla']['seconds']:.3f} s.")
    if "rss_slopes_bytes_per_1k_tokens" in r:
        steps = list(zip(r["lengths"], r["lengths"][1:], strict=False))
        rows.append("Our peak RSS per 1k more tokens (no window), " + ", ".join(
            f"{a // 1024}k->{b // 1024}k {slope / 2**20:.0f} MiB" for (a, b), slope in zip(
                steps, r["rss_slopes_bytes_per_1k_tokens"], strict=True)) + ".")
    return "\n".join(rows)


def chart(flat: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values, targets = [], [], []
    for what, (section, key), target, kind in TARGETS:
        if section in flat and key in flat[section] and kind == "min":
            names.append(what.replace(", ours / transformers", "").replace(" (", "\n("))
            values.append(flat[section][key])
            targets.append(target)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1))
    y = range(len(names))
    ax.barh(y, values, color=["tab:green" if v >= t else "tab:red"
                              for v, t in zip(values, targets, strict=True)])
    ax.scatter(targets, y, marker="|", s=300, color="black", label="target")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (MFU / MBU / greedy agreement: fraction)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="no conversion benchmark")
    parser.add_argument("--only", default=None, metavar="NAMES", help="comma-separated: run "
                        f"only these of {','.join(BENCHES)}; the table has their rows alone")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else [
        n for n in BENCHES if n != "convert" or not args.quick]
    unknown = set(names) - set(BENCHES)
    if unknown:
        parser.error(f"--only {args.only}: no benchmark {', '.join(sorted(unknown))}")
    if args.only:  # a partial run: its own files, the full run's stay
        args.out = args.out / ("only-" + "-".join(names))
        args.out.mkdir(exist_ok=True)
    raw = {}
    for name in names:
        extra = ["--quick"] if name == "long" and args.quick else []
        script, *flags = BENCHES[name]
        raw[name] = bench(script, args.out / f"{name}.json", *flags, *extra)
    if args.quick and not args.only and (args.out / "convert.json").exists():
        raw["convert"] = {**json.loads((args.out / "convert.json").read_text()), "earlier": True}
    flat = summary(raw)
    (args.out / "results.json").write_text(json.dumps({"summary": flat, **raw}, indent=1) + "\n")
    (args.out / "results.md").write_text(table(raw, flat))
    chart(flat, args.out / "results.png")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
