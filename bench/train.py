"""`python bench/train.py`: one training step (forward, backward, AdamW) of the fixed benchmark
config (DESIGN.md "Benchmarks": Mistral, vocab 8000, hidden 512, intermediate 1536, 4 layers,
8 heads, 2 kv heads, head_dim 64, no window, untied; batch 8 x 256; float32), ours on one
device vs transformers' MistralForCausalLM with torch.optim.AdamW, in the same run with the
same thread count; medians after warm-up. MFU is GEMM-relative: model FLOPs/s over a jitted
large float32 matmul's FLOPs/s measured in the same run (train/flops.py counts the FLOPs).

    python bench/train.py [--repeats 5] [--remat none] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mistral_jax  # noqa: E402
from bench.common import timed  # noqa: E402
from mistral_jax import configs, models  # noqa: E402
from train import data as D  # noqa: E402
from train import flops  # noqa: E402
from train import step as S  # noqa: E402

CONFIG = configs.preset("mistral-20m")
BATCH, SEQ, LR = 8, 256, 1e-4


def ours(ids: np.ndarray, remat: str):
    mesh = mistral_jax.make_mesh("1x1", jax.devices()[:1])
    with jax.set_mesh(mesh):
        model = models.init(CONFIG, seed=0, mesh=mesh)
        model.remat = remat
        params = models.weights(model)
        tx = S.optimizer(lr=LR, warmup=0, steps=1000, weight_decay=0.1, clip=1.0)
        shardings = S.state_shardings(params, tx, mesh)
        state = S.init_state(params, tx, 0, shardings)
        step = S.make_train_step(model, tx, shardings, dtype=jnp.float32,
                                 assemble=lambda p, f: p)
        rows = D.Rows(ids, ids, np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape),
                      np.zeros_like(ids))
        batch = D.place(rows, np.arange(BATCH)[None], jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, "data", None)))
        holder = {"state": state}

        def run():
            holder["state"], m = step(holder["state"], {}, batch)
            m["loss"].block_until_ready()

        return run


def theirs(ids: np.ndarray):
    hf = transformers.MistralConfig(
        vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.hidden_size,
        intermediate_size=CONFIG.intermediate_size, num_hidden_layers=CONFIG.num_hidden_layers,
        num_attention_heads=CONFIG.num_attention_heads,
        num_key_value_heads=CONFIG.num_key_value_heads, head_dim=CONFIG.head_dim,
        sliding_window=None, tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(hf).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    t_ids = torch.tensor(ids, dtype=torch.long)

    def run():
        loss = model(input_ids=t_ids, labels=t_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    threads = os.cpu_count() if jax.devices()[0].platform == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, SEQ)).astype(np.int32)
    step_flops = flops.training_flops_per_token(CONFIG, SEQ) * BATCH * SEQ
    runs = {"ours": ours(ids, args.remat)}
    if not args.skip_torch:
        runs["transformers"] = theirs(ids)
    for run in runs.values():
        timed(run, args.warmup, 0)
    # Rounds of (matmul, ours, transformers): on a shared machine the load drifts, so each
    # round's three figures are taken under the same conditions and the medians compared.
    gemm, times = [], {name: [] for name in runs}
    for _ in range(args.repeats):
        gemm.append(flops.matmul_flops_per_s(jax.devices()[0], jnp.float32, repeats=3))
        for name, run in runs.items():
            times[name] += timed(run, 0, 1)
    peak = float(np.median(gemm))
    result = {"device": str(jax.devices()[0].device_kind), "threads": threads,
              "remat": args.remat, "gemm_gflops": peak / 1e9,
              "gemm_gflops_rounds": [g / 1e9 for g in gemm], "step_gflop": step_flops / 1e9,
              "seconds": times}
    print(f"{CONFIG.num_params() / 1e6:.1f}M-parameter Mistral, batch {BATCH} x {SEQ}, float32, "
          f"AdamW, {threads} threads, {result['step_gflop']:.1f} GFLOP per step; float32 GEMM "
          f"median {peak / 1e9:.1f} GFLOP/s (rounds: "
          + ", ".join(f"{g / 1e9:.0f}" for g in gemm) + ")")
    for name, seconds in times.items():
        s = float(np.median(seconds))
        mfu = float(np.median([step_flops / t / g for t, g in zip(seconds, gemm, strict=True)]))
        short = "ours" if name == "ours" else "theirs"  # flat keys, as bench/run.py reads them
        result.update({f"{short}_s": s, f"{short}_tokens_per_s": BATCH * SEQ / s,
                       f"{short}_mfu": mfu})
        print(f"{name:>12}: {s:.3f} s/step  {BATCH * SEQ / s:8.1f} tok/s  MFU {100 * mfu:.1f}% "
              f"(rounds: " + ", ".join(f"{t:.2f}" for t in seconds) + " s)")
    if "transformers" in times:
        ratios = [t / o for o, t in zip(times["ours"], times["transformers"], strict=True)]
        result["speedup"] = float(np.median(ratios))
        print(f"ours / transformers tokens/s: {result['speedup']:.2f}x (median of per-round "
              "ratios)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
