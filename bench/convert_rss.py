"""Peak memory of `python -m convert.from_torch` on a synthetic checkpoint of 4 GB or more.

    .venv/bin/python bench/convert_rss.py [--layers 16] [--keep DIR]

Writes a random Mistral-shaped HF folder (float32, vocab 32000, hidden 2048, intermediate 8192,
16 heads, 8 kv heads; 16 layers = 4.4 GB) as model.safetensors and as pytorch_model.bin,
converts each in a fresh process and reports that process's peak RSS (ru_maxrss, which counts
mapped file pages too) against the largest tensor and the model. The target for safetensors
sources: peak <= 1.5 x largest tensor + 1 GiB. The process that only imports the converter is
measured too, to show what the 1 GiB is spent on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 32000,
          "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16,
          "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 1e4,
          "max_position_embeddings": 4096, "sliding_window": 4096, "tie_word_embeddings": False}

MEASURE = """
import resource, runpy, sys
sys.argv = ["from_torch", *sys.argv[1:]]
try:
    if sys.argv[1] != "--import-only":
        runpy.run_module("convert.from_torch", run_name="__main__")
    else:
        import convert.from_torch  # noqa
except SystemExit as e:
    assert not e.code, e.code
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def shapes(c: dict) -> dict[str, tuple]:
    d, f, h = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * h, c["num_key_value_heads"] * h
    out = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,),
           "lm_head.weight": (c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f)}
    return out


def write_safetensors(path: Path, tensor_shapes: dict[str, tuple], rng) -> None:
    """A float32 safetensors file written one tensor at a time."""
    header, offset = {}, 0
    for k, s in tensor_shapes.items():
        n = 4 * int(np.prod(s))
        header[k] = {"dtype": "F32", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for s in tensor_shapes.values():
            rng.standard_normal(s, np.float32).__imul__(0.02).tofile(f)


def write_bin(folder: Path) -> None:
    """pytorch_model.bin with the same tensors, made in a child process (it holds them all)."""
    code = ("import sys, torch; from safetensors.torch import load_file; "
            "torch.save(load_file(sys.argv[1]), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(folder / "model.safetensors"),
                    str(folder / "pytorch_model.bin")], check=True)


def peak_rss(args: list[str]) -> int:
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split("PEAK_KB")[1].split()[0]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="convert-rss-"))
    config = {**CONFIG, "num_hidden_layers": args.layers}
    tensor_shapes = shapes(config)
    sizes = {k: 4 * int(np.prod(s)) for k, s in tensor_shapes.items()}
    largest, model = max(sizes.values()), sum(sizes.values())
    try:
        for name in ("safetensors", "bin"):
            (work / name).mkdir(parents=True, exist_ok=True)
            (work / name / "config.json").write_text(json.dumps(config))
        if not (work / "safetensors" / "model.safetensors").exists():
            write_safetensors(work / "safetensors" / "model.safetensors", tensor_shapes,
                              np.random.default_rng(0))
        if not (work / "bin" / "pytorch_model.bin").exists():
            (work / "bin" / "model.safetensors").symlink_to(
                work / "safetensors" / "model.safetensors")
            write_bin(work / "bin")
            (work / "bin" / "model.safetensors").unlink()
        results = {"largest_tensor_bytes": largest, "model_bytes": model,
                   "import_only_peak_bytes": peak_rss(["--import-only"])}
        for name in ("safetensors", "bin"):
            out = work / f"out-{name}"
            peak = peak_rss([str(work / name), str(out), "--overwrite", "--no-progress"])
            shutil.rmtree(out)
            results[name] = {"peak_bytes": peak, "peak_over_largest": peak / largest,
                             "peak_over_model": peak / model,
                             "target_bytes": 1.5 * largest + 2**30}
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    gib = 2**30
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nmodel {model / gib:.2f} GiB, largest tensor {largest / gib:.3f} GiB, "
          f"importing the converter alone {results['import_only_peak_bytes'] / gib:.2f} GiB\n")
    print("| source | peak RSS | / largest tensor | / model | target 1.5 x largest + 1 GiB |")
    print("|---|---|---|---|---|")
    for name in ("safetensors", "bin"):
        r = results[name]
        ok = "met" if r["peak_bytes"] <= r["target_bytes"] else "missed"
        print(f"| {name} | {r['peak_bytes'] / gib:.2f} GiB | {r['peak_over_largest']:.2f} | "
              f"{r['peak_over_model']:.2f} | {r['target_bytes'] / gib:.2f} GiB ({ok}) |")


if __name__ == "__main__":
    main()
