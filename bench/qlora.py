"""`python bench/qlora.py`: LoRA over a frozen int8 base (QLoRA, `train.finetune --quantize-base
int8`) against LoRA over the float32 base, in one run, on the default run's model
(train/input/default.py CONFIG, 5.1M parameters), LoRA rank 8:

1. the train step (batch 8 x 256, one device, float32 compute, AdamW; LoRA on q, v,
   train.finetune's default targets, or --step-targets): the float base with the
   adapters merged into it each step (W + scale A B, how LoRA trained before), the float base
   with the adapters beside it (x W + scale (x A) B), the int8 base beside; medians of rounds
   that take one step of each in turn, and each compiled step's temporary bytes (XLA);
2. one layer's int8 matmuls at a micro-batch's 2048 rows, forward: our CPU kernel against
   XLA's dequantizing dot (what training uses);
3. the frozen base's bytes (the sum of its arrays' nbytes), int8 against float32;
4. the loss: the default run trains a base (`--base-steps`), then the same LoRA run
   (`--lora-steps`, every target, `--lora-lr`, on the default corpus and its held-out entries) over
   it as float32 and as int8; the mean train loss of the last 5 steps and the final eval loss.

    .venv/bin/python bench/qlora.py [--repeats 5] [--base-steps 120] [--lora-steps 30]
        [--lora-lr 3e-3] [--step-targets q,v] [--skip-losses] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mistral_jax  # noqa: E402
from bench.common import median_time, timed  # noqa: E402
from mistral_jax import kernels  # noqa: E402
from mistral_jax.base import trees  # noqa: E402
from mistral_jax.io import lora  # noqa: E402
from mistral_jax.model import registry as models  # noqa: E402
from mistral_jax.quant import int8 as quant  # noqa: E402
from train.compute import step as S  # noqa: E402
from train.input import data as D  # noqa: E402
from train.input import default  # noqa: E402

BATCH, SEQ, RANK = 8, 256, 8


def steps(ids: np.ndarray, targets: list[str]) -> dict:
    """{name: (run one step, the compiled step's temporary bytes)} for the three ways."""
    mesh = mistral_jax.make_mesh("1x1", jax.devices()[:1])
    out = {}
    with jax.set_mesh(mesh):
        model = models.init(default.CONFIG, seed=0, mesh=mesh)
        bases = {"float": model, "int8": quant.quantized(model)}
        rows = D.Rows(ids, ids, np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape),
                      np.zeros_like(ids))
        batch = D.place(rows, np.arange(BATCH)[None], jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, "data", None)))
        tx = S.optimizer(lr=1e-3, warmup=0, steps=1000, weight_decay=0.1, clip=1.0)
        for name, base, merged in (("float merged", "float", True),
                                   ("float beside", "float", False),
                                   ("int8 beside", "int8", False)):
            frozen = trees.weights(bases[base])
            params = lora.init(frozen, trees.logical_axes(bases[base]), targets, RANK, 0, mesh)
            scale = 2.0
            if merged:
                template, assemble = model, lambda p, f: lora.merge(f, p, 2.0)
            else:
                template, assemble = lora.attach(bases[base], params, scale), lora.beside
            shardings = S.state_shardings(params, tx, mesh)
            state = S.init_state(params, tx, 0, shardings)
            step = S.make_train_step(template, tx, shardings, dtype=jnp.float32,
                                     assemble=assemble, isolate_documents=False)
            temp = step.lower(state, frozen, batch).compile().memory_analysis()
            holder = {"state": state}

            def run(step=step, holder=holder, frozen=frozen):
                holder["state"], m = step(holder["state"], frozen, batch)
                m["loss"].block_until_ready()

            out[name] = (run, int(temp.temp_size_in_bytes) if temp else None)
        out["bytes"] = {k: sum(x.nbytes for x in jax.tree.leaves(trees.weights(b)))
                        for k, b in bases.items()}
    return out


def layer_matmuls(rows: int, repeats: int) -> dict:
    """Seconds of one layer's seven int8 matmuls (the default model's q, k, v, o, gate, up,
    down as [K, N]) at `rows` rows, in the CPU kernel and in XLA's dequantizing dot."""
    c = default.CONFIG
    heads, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = [(c.hidden_size, heads), (c.hidden_size, kv), (c.hidden_size, kv),
              (heads, c.hidden_size), (c.hidden_size, c.intermediate_size),
              (c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size)]
    key = iter(jax.random.split(jax.random.key(0), 2 * len(shapes)))
    ws = [quant.quantize(jax.random.normal(next(key), s), 0, 1, "kn") for s in shapes]
    xs = [jax.random.normal(next(key), (rows, s[0])) for s in shapes]
    out = {}
    for name, matmul in (("kernel", kernels.matmul), ("xla", kernels.reference)):
        f = jax.jit(lambda xs, ws, matmul=matmul: [matmul(x, v, s) for x, (v, s) in
                                                   zip(xs, ws, strict=True)])
        out[name] = median_time(lambda f=f: jax.block_until_ready(f(xs, ws)), repeats, 2)
    return out


def finetune(out: Path, *flags: str) -> list[dict]:
    """A `python -m train.finetune` run in its own process, as a user starts it: its metrics."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-m", "train.finetune", "--out", str(out), *flags],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(base_steps: int, lora_steps: int, lr: float) -> dict:
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        finetune(tmp / "base", "--steps", str(base_steps))
        flags = ["--init", str(tmp / "base" / "final"), "--lora-rank", str(RANK), "--steps",
                 str(lora_steps), "--lr", str(lr), "--eval-every", str(lora_steps),
                 "--lora-targets", "q,k,v,o,gate,up,down"]
        for name, extra in (("float32", []), ("int8", ["--quantize-base", "int8"])):
            rows = finetune(tmp / name, *flags, *extra)
            train = [r["loss"] for r in rows if "loss" in r]
            result[name] = {"train_last5": float(np.mean(train[-5:])), "first": train[0],
                            "eval": [r["eval_loss"] for r in rows if "eval_loss" in r][-1],
                            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in
                                                             rows if "loss" in r][1:]))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base-steps", type=int, default=120)
    parser.add_argument("--lora-steps", type=int, default=30)
    parser.add_argument("--step-targets", default="q,v", help="LoRA targets of the timed "
                        "steps (default q,v: train.finetune's)")
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--skip-losses", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?") if os.path.exists("/proc/cpuinfo") else "?"
    result = {"device": f"{jax.devices()[0].device_kind}: {cpu}, {os.cpu_count()} cores"}
    print(result["device"])
    ids = np.random.default_rng(0).integers(0, default.VOCAB, (BATCH, SEQ)).astype(np.int32)
    made = steps(ids, args.step_targets.split(","))
    result["base_bytes"] = made.pop("bytes")
    ratio = result["base_bytes"]["int8"] / result["base_bytes"]["float"]
    print(f"frozen base: int8 {result['base_bytes']['int8'] / 1e6:.2f} MB, float32 "
          f"{result['base_bytes']['float'] / 1e6:.2f} MB ({ratio:.3f}x)")
    for run, _ in made.values():
        timed(run, 2, 0)
    seconds = {name: [] for name in made}
    for _ in range(args.repeats):
        for name, (run, _) in made.items():
            seconds[name] += timed(run, 0, 1)
    result["step_s"] = {k: float(np.median(v)) for k, v in seconds.items()}
    result["step_vs_float_merged"] = {k: float(np.median(np.array(v) / seconds["float merged"]))
                                      for k, v in seconds.items()}
    result["step_temp_bytes"] = {k: temp for k, (_, temp) in made.items()}
    for name, s in result["step_s"].items():
        print(f"{name:>13}: {s * 1e3:7.1f} ms/step, "
              f"{result['step_vs_float_merged'][name]:.2f}x float merged's (median of rounds), "
              f"temp {made[name][1] / 1e6:7.1f} MB "
              "(rounds: " + ", ".join(f"{t * 1e3:.0f}" for t in seconds[name]) + " ms)")
    result["layer_matmuls_2048_rows_s"] = layer_matmuls(BATCH * SEQ, args.repeats)
    mm = result["layer_matmuls_2048_rows_s"]
    print(f"one layer's int8 matmuls at {BATCH * SEQ} rows: kernel {mm['kernel'] * 1e3:.2f} ms, "
          f"XLA dequantizing {mm['xla'] * 1e3:.2f} ms ({kernels.isa()})")
    if not args.skip_losses:
        result["losses"] = got = losses(args.base_steps, args.lora_steps, args.lora_lr)
        for name, r in got.items():
            print(f"LoRA {args.lora_steps} steps on the {name} base: loss {r['first']:.5f} -> "
                  f"{r['train_last5']:.5f} (mean of the last 5), eval {r['eval']:.5f}, "
                  f"{r['tokens_per_s']:.0f} tokens/s")
        diff = {k: got["int8"][k] - got["float32"][k] for k in ("train_last5", "eval")}
        print(f"int8 - float32: train {diff['train_last5']:+.5f}, eval {diff['eval']:+.5f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
