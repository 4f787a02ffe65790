"""`python bench/train.py`: one training step (forward, backward, AdamW) of the fixed benchmark
config (DESIGN.md "Benchmarks": Mistral, vocab 8000, hidden 512, intermediate 1536, 4 layers,
8 heads, 2 kv heads, head_dim 64, no window, untied; batch 8 x 256; float32), ours on one
device vs transformers' MistralForCausalLM with torch.optim.AdamW, in the same run with the
same thread count; medians after warm-up. MFU is GEMM-relative: model FLOPs/s over a jitted
large float32 matmul's FLOPs/s measured in the same run (train/compute/flops.py counts the FLOPs).

    python bench/train.py [--repeats 5] [--remat none] [--json out.json]

On a GPU (bench/gpu.sh) the same step runs at a realistic size: `--preset mistral-7b --layers 2
--batch 4 --seq 2048 --dtype bfloat16 --device cuda` (bfloat16 compute over float32 weights on
our side, torch.autocast on theirs), and MFU is also given against the chip's datasheet peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mistral_jax  # noqa: E402
from bench.common import chip_peaks, timed  # noqa: E402
from mistral_jax.arch import configs
from mistral_jax.base import trees  # noqa: E402
from mistral_jax.model import registry as models
from mistral_jax.model.options import Options  # noqa: E402
from mistral_jax.parallel import sharding  # noqa: E402
from train import finetune  # noqa: E402
from train.compute import flops  # noqa: E402
from train.compute import step as S  # noqa: E402
from train.input import data as D  # noqa: E402

CONFIG = configs.preset("mistral-20m")
BATCH, SEQ, LR = 8, 256, 1e-4


def ours(ids: np.ndarray, remat: str, config=CONFIG, dtype=jnp.float32, unroll=1,
         attention: str = "auto", mesh_spec: str = "1x1", holder: dict | None = None):
    """The trainer's step on `mesh_spec` (one device by default); `holder` (a dict) gets the
    state, which the returned `run()` steps."""
    mesh = mistral_jax.make_mesh(mesh_spec, jax.devices()[:math.prod(
        sharding.parse_mesh(mesh_spec))])
    batch_size, seq = ids.shape
    with jax.set_mesh(mesh):
        model = models.init(config, seed=0, mesh=mesh,
                            options=Options(remat=remat, unroll=unroll, attention=attention))
        params = trees.weights(model)
        tx = S.optimizer(lr=LR, warmup=0, steps=1000, weight_decay=0.1, clip=1.0)
        shardings = S.state_shardings(params, tx, mesh)
        state = S.init_state(params, tx, 0, shardings)
        # one random stream of tokens, as transformers sees it: no documents to keep apart
        loss = S.causal_lm_loss(model, dtype=dtype, assemble=lambda p, f: p,
                                isolate_documents=False)
        step = S.make_train_step(tx, shardings, loss)
        rows = D.Rows(ids, ids, np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape),
                      np.zeros_like(ids))
        batch = D.place(rows, np.arange(batch_size)[None], jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, sharding.split_over(mesh, sharding.BATCH),
                                             None)))
        holder = {} if holder is None else holder
        holder["state"] = state

        def run():
            with jax.set_mesh(mesh):
                holder["state"], m = step(holder["state"], {}, batch)
            m["loss"].block_until_ready()

        return run


def user(ids: np.ndarray, config=CONFIG):
    """A user's own step, as the public API invites: `jax.jit` of `jax.value_and_grad` of a
    cross-entropy over `mistral_jax.forward`'s logits, optax AdamW on the model itself (clipped
    at 1.0, as the others)."""
    import optax

    model = mistral_jax.init(config, seed=0)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(LR, b1=0.9, b2=0.95, weight_decay=0.1))
    holder = {"model": model, "opt": tx.init(model)}
    x = jnp.asarray(ids)

    def loss_fn(model, ids):
        logits = mistral_jax.forward(model, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(model, opt, ids):
        loss, grads = jax.value_and_grad(loss_fn)(model, ids)
        updates, opt = tx.update(grads, opt, model)
        return optax.apply_updates(model, updates), opt, loss

    def run():
        holder["model"], holder["opt"], loss = step(holder["model"], holder["opt"], x)
        loss.block_until_ready()

    return run


def theirs(ids: np.ndarray, config=CONFIG, device: str = "cpu", dtype=torch.float32):
    hf = transformers.MistralConfig(**configs.to_hf_dict(config))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.MistralForCausalLM(hf).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    t_ids = torch.tensor(ids, dtype=torch.long, device=device)

    def run():
        with torch.autocast(device.split(":")[0], dtype, enabled=dtype != torch.float32):
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
    parser.add_argument("--unroll", type=finetune.unroll_count, default=True,
                        help="layers per scan iteration, or 'all' (default: all, as "
                        "`python -m train.finetune --unroll all`)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--preset", help="a config preset in place of the fixed CPU config")
    parser.add_argument("--layers", type=int, help="with --preset: this many of its layers")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (weights and optimizer stay float32)")
    parser.add_argument("--device", default="cpu", help="torch device for transformers")
    parser.add_argument("--window", type=int, default=None, help="a sliding window (Mistral's)")
    parser.add_argument("--attention", default="auto", help="our attention implementation")
    parser.add_argument("--only", choices=["ours", "user", "transformers"], help="time one "
                        "side only (its peak RSS is then its own: bench/long.py runs each in a "
                        "process)")
    parser.add_argument("--no-user", action="store_true", help="leave out the user's own "
                        "jax.grad step")
    args = parser.parse_args()
    config = CONFIG
    if args.preset:
        config = configs.preset(args.preset)
        layers = args.layers or config.num_hidden_layers
        config = dataclasses.replace(config, num_hidden_layers=layers, sliding_window=None)
    config = dataclasses.replace(config, sliding_window=args.window,
                                 max_position_embeddings=max(config.max_position_embeddings,
                                                             args.seq))
    threads = os.cpu_count() if jax.devices()[0].platform == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
    ids = ids.astype(np.int32)
    tokens = args.batch * args.seq
    step_flops = flops.training_flops_per_token(config, args.seq) * tokens
    runs = {}
    if args.only in (None, "ours"):
        runs["ours"] = ours(ids, args.remat, config, getattr(jnp, args.dtype), args.unroll,
                            args.attention)
    if args.only in (None, "user") and not args.no_user and args.dtype == "float32":
        runs["user"] = user(ids, config)
    if not args.skip_torch and args.only in (None, "transformers"):
        runs["transformers"] = theirs(ids, config, args.device, getattr(torch, args.dtype))
    for run in runs.values():
        timed(run, args.warmup, 0)
    # Rounds of (matmul, ours, transformers): on a shared machine the load drifts, so each
    # round's three figures are taken under the same conditions and the medians compared. Each
    # framework takes an untimed step first in its turn: right after the other one's step, a
    # step of either ran up to 20% slower (caches and page mappings held by the other).
    gemm, times = [], {name: [] for name in runs}
    for _ in range(args.repeats):
        gemm.append(flops.matmul_flops_per_s(jax.devices()[0], getattr(jnp, args.dtype),
                                               repeats=3))
        for name, run in runs.items():
            times[name] += timed(run, 1, 1)
    peak = float(np.median(gemm))
    result = {"device": str(jax.devices()[0].device_kind), "threads": threads,
              "config": dataclasses.asdict(config), "batch": args.batch, "seq": args.seq,
              "dtype": args.dtype, "remat": args.remat, "unroll": args.unroll,
              "gemm_gflops": peak / 1e9,
              "gemm_gflops_rounds": [g / 1e9 for g in gemm], "step_gflop": step_flops / 1e9,
              "seconds": times, "window": args.window, "attention": args.attention,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    chip = chip_peaks(result["device"])
    print(f"{config.num_params() / 1e6:.1f}M-parameter Mistral, batch {args.batch} x {args.seq}, "
          f"{args.dtype}, AdamW, {threads} threads, {result['step_gflop']:.1f} GFLOP per step; "
          f"{args.dtype} GEMM median {peak / 1e9:.1f} GFLOP/s (rounds: "
          + ", ".join(f"{g / 1e9:.0f}" for g in gemm) + ")")
    for name, seconds in times.items():
        s = float(np.median(seconds))
        mfu = float(np.median([step_flops / t / g for t, g in zip(seconds, gemm, strict=True)]))
        short = {"transformers": "theirs"}.get(name, name)  # flat keys, as bench/run.py reads
        result.update({f"{short}_s": s, f"{short}_tokens_per_s": tokens / s,
                       f"{short}_mfu": mfu})
        chip_mfu = ""
        if chip is not None:  # an accelerator: MFU against its datasheet bfloat16 peak too
            result[f"{short}_chip_mfu"] = step_flops / s / chip[0]
            chip_mfu = f", {100 * result[f'{short}_chip_mfu']:.1f}% of the chip's bf16 peak"
        print(f"{name:>12}: {s:.3f} s/step  {tokens / s:8.1f} tok/s  MFU {100 * mfu:.1f}%"
              f"{chip_mfu} (rounds: " + ", ".join(f"{t:.2f}" for t in seconds) + " s)")
    print(f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    for name, key in (("ours", "speedup"), ("user", "user_speedup")):
        if name in times and "transformers" in times:
            ratios = [t / o for o, t in zip(times[name], times["transformers"], strict=True)]
            result[key] = float(np.median(ratios))
            print(f"{name} / transformers tokens/s: {result[key]:.2f}x (median of per-round "
                  "ratios)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
