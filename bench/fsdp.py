"""`python bench/fsdp.py`: what FSDP's gathers cost where there is no interconnect. The trainer's
step (bench/train.py's, float32, AdamW) on the 20M benchmark model, batch 8 x 256, on 8 fake CPU
devices of this machine, as 1x8x1 (8-way FSDP: each device holds 1/8 of the weights and
optimizer state, gathers each layer's weights when it uses them and reduce-scatters their
gradients) against 8x1 (plain data parallelism: whole copies, one all-reduce of the gradients),
in alternating rounds; and the bytes of weights + optimizer state each device holds, read off
the arrays. A ratio, not a target: the fake devices share the CPU's cores and copy through its
memory, so this is the gathers' overhead without a network, not a cluster's figure.

    python bench/fsdp.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import timed  # noqa: E402
from bench.train import BATCH, CONFIG, SEQ, ours  # noqa: E402

MESHES = {"fsdp": "1x8x1", "data": "8x1"}


def held_bytes(state) -> int:
    """The most bytes of weights + optimizer state any one device holds."""
    per_device: dict = {}
    for x in jax.tree.leaves((state.params, state.opt_state)):
        for piece in x.addressable_shards:
            per_device[piece.device] = per_device.get(piece.device, 0) + piece.data.nbytes
    return max(per_device.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, SEQ)).astype(np.int32)
    runs, held = {}, {}
    for name, spec in MESHES.items():
        holder: dict = {}
        runs[name] = ours(ids, "none", mesh_spec=spec, holder=holder)
        timed(runs[name], 2, 0)  # compile and warm up
        held[name] = held_bytes(holder["state"])
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternating, so that drifting load falls on both alike
        for name, run in runs.items():
            seconds[name] += timed(run, 0, 1)
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    result = {"device": jax.devices()[0].device_kind, "cores": os.cpu_count(),
              "params_m": CONFIG.num_params() / 1e6, "batch": BATCH, "seq": SEQ,
              "meshes": MESHES, "seconds": seconds, "median_s": median,
              "held_bytes": held, "fsdp_over_data_time": median["fsdp"] / median["data"],
              "fsdp_over_data_bytes": held["fsdp"] / held["data"]}
    print(f"{result['params_m']:.1f}M Mistral, batch {BATCH} x {SEQ}, float32 AdamW, 8 fake CPU "
          f"devices on {os.cpu_count()} cores")
    for name, spec in MESHES.items():
        print(f"  {spec:6} ({name:4}): step {median[name]:.2f} s, weights + optimizer state "
              f"{held[name] / 2**20:.1f} MiB per device")
    print(f"FSDP / data parallel: step time {result['fsdp_over_data_time']:.2f}x, bytes held "
          f"{result['fsdp_over_data_bytes']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
