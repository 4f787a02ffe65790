"""MFU: the model FLOPs of a training step over what the step's devices could do in its time.

    MFU = model FLOPs of the step / (the step's seconds x the devices' peak FLOP/s)

Model FLOPs (PaLM, Chowdhery et al. 2022, appendix B) are the multiply-adds the model's
mathematics needs, counted as the least any implementation of the step must compute:
- each matmul weight, per token: 2 forward; 2 for its weight gradient when it is trained; 2 for
  its input gradient when a trained weight lies below it (the gradient has to pass through to
  reach that weight). Full fine-tuning trains the embedding, below everything: 6 per weight
  (Kaplan et al. 2020). LoRA: 4 per frozen weight above the lowest adapter, 2 below it, plus the
  adapters' own products x A B (6 per adapter weight above the lowest adapter).
- attention, per query head and per (query, key) pair the mask lets through: 4 * head_dim
  forward (the scores and their use), backward up to twice that, as the same rule says. Pairs
  are counted from each batch: causal, inside the sliding window, inside a document when
  documents are isolated, no padding.
- nothing else: the embedding lookup is not a matmul; norms, activations, softmax and the loss
  are elementwise; remat's recomputation, the padded vocabulary, kv heads repeated for tensor
  parallelism and LoRA's merge of A B into the weight are work an implementation chooses.

The peak is measured where the step runs, once per process: matmuls on each of the mesh's
GPUs or TPUs at once, or on a CPU on the real device of each process (fake CPU devices split the
same cores, and can only lose to it); in the compute dtype and in float32 (a step keeps norms,
softmax and the loss in float32); large ones, and on a CPU many small ones too (`SIZES`); the
fastest run of them all, and of every earlier run on the same machine (kept in
${MISTRAL_JAX_CACHE:-~/.cache/mistral_jax}/peaks.json). Other work on the machine only ever
slows a run down, so the fastest is the nearest to what the hardware does, where a median moves
with the load: on 2 cores shared with other work, runs a few minutes apart measured 58, 83, 91,
114, 117 and 168 GFLOP/s, and MFU moved with them until they shared the best.

So MFU stays below 1: the step computes at least the model FLOPs, and none of its parts runs
faster than the hardware's matmuls. Where a step still comes out faster than the peak, the peak
was measured while other work slowed the machine: it is measured again, and never set below a
rate a step reached (each is a floor of what the hardware does). The steps' own times still
move with the machine's load, and MFU with them: on 2 cores shared with other work, the same
run of the default model went from 420 to 760 tokens/s within a minute.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.arch.configs import model_type

# When each weight of a layer runs: q/k/v read the layer's input, then attention, then o, the
# MLP's first matmuls, its last. The LM head runs after every layer.
STAGES = {"q": 0, "k": 0, "v": 0, "o": 1, "gate": 2, "up": 2, "fc": 2, "down": 3, "proj": 3}


def layer_matmuls(config) -> dict[str, tuple[int, int]]:
    """Each matmul weight of one layer: name -> (inputs, outputs) per token."""
    d, f = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    mlp = ({"gate": (d, f), "up": (d, f), "down": (f, d)} if model_type(config) == "mistral"
           else {"fc": (d, f), "proj": (f, d)})
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), **mlp}


@dataclass(frozen=True)
class StepFlops:
    """A training step's model FLOPs: `per_token` for the weights' matmuls, `per_pair` for
    attention per (query, key) pair a query sees (both summed over the layers)."""

    per_token: float
    per_pair: float

    def of(self, tokens: int, pairs: int) -> float:
        return self.per_token * tokens + self.per_pair * pairs


def training_flops(config, *, lora_targets=(), lora_rank: int = 0) -> StepFlops:
    """The model FLOPs of a step that trains every weight, or (with `lora_rank`) only LoRA
    adapters of that rank on `lora_targets` in every layer, as the module docstring counts."""
    lora = set(lora_targets) if lora_rank else None
    full = lora is None
    # The lowest place (layer, stage) a trained weight is: the embedding, below layer 0, when
    # every weight is trained. A weight above it passes the gradient on to its input.
    lowest = (-1, 0) if full else (0, min(STAGES[name] for name in lora))
    per_token = per_pair = 0.0
    for layer in range(config.n_layers):
        for name, (n_in, n_out) in layer_matmuls(config).items():
            through = (layer, STAGES[name]) > lowest
            per_token += 2 * n_in * n_out * (1 + full + through)
            if not full and name in lora:  # x A B: forward, dB and d(xA), dA, then dx if needed
                r = lora_rank
                per_token += 2 * r * (n_in + n_out) + 4 * r * n_out + 2 * r * n_in * (1 + through)
        # Attention reads q, k, v (stage 0): the gradient of each is needed when it is trained
        # or lies above the lowest trained weight.
        need = {name: full or (layer, 0) > lowest or name in lora for name in ("q", "k", "v")}
        backward = 2 * (need["v"] + (need["q"] or need["k"]) + need["q"] + need["k"])
        per_pair += config.num_attention_heads * config.head_dim * (4 + backward)
    head = 2 * config.hidden_size * config.vocab_size  # the LM head (the table when tied)
    per_token += head * (2 + full)  # its input gradient always: something below is trained
    return StepFlops(per_token, per_pair)


def forward_flops(config) -> StepFlops:
    """The model FLOPs of a forward pass alone (preference tuning's reference under LoRA):
    2 per matmul weight per token, 4 * head_dim per query head and (query, key) pair."""
    per_token = sum(2 * n_in * n_out for n_in, n_out in layer_matmuls(config).values())
    per_pair = config.num_attention_heads * config.head_dim * 4
    return StepFlops(config.n_layers * per_token + 2 * config.hidden_size * config.vocab_size,
                     config.n_layers * per_pair)


def attention_pairs(segments: np.ndarray, window: int | None, isolate_documents: bool) -> int:
    """The (query, key) pairs a causal mask lets through in rows of document ids `segments`
    [..., seq] (-1: padding): inside the window, inside a document when documents are
    isolated, no padding on either side."""
    rows = segments.reshape(-1, segments.shape[-1])
    real = rows >= 0
    runs = rows if isolate_documents else real  # what a query must share with its keys
    starts = np.ones_like(real)
    starts[:, 1:] = runs[:, 1:] != runs[:, :-1]
    index = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
    since_start = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    seen = since_start + 1 if window is None else np.minimum(since_start + 1, window)
    return int(np.where(real, seen, 0).sum())


# --- the peak ------------------------------------------------------------------------------------

# The matmuls [n, n] x [n, n] that measure a peak, as (n, runs) on each device. On a CPU, a
# large one, which an idle machine runs fastest, and many small ones, which find the idle moments
# of a busy one: on 2 cores shared with other work, the best of 100 runs of 512 measured 81-139
# GFLOP/s where the best of 6 runs of 2048 measured 36-64, in the same minutes.
SIZES = {"cpu": ((2048, 4), (512, 128))}
ACCELERATOR_SIZES = ((8192, 6),)
RUNS = 6


def matmul_flops_per_s(devices=None, dtype=jnp.float32, n: int | None = None,
                       repeats: int = RUNS) -> float:
    """FLOP/s of a jitted [n, n] x [n, n] matmul (default: the platform's largest in SIZES) on
    each of `devices` (a device or a list; default the first) at once, as one sharded batch:
    the fastest of `repeats` runs after a warm-up. Measured afresh at each call
    (`peak_flops_per_s` keeps its figure)."""
    devices = [jax.devices()[0]] if devices is None else devices
    devices = list(devices) if isinstance(devices, list | tuple) else [devices]
    n = n or SIZES.get(devices[0].platform, ACCELERATOR_SIZES)[0][0]
    at = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P("devices"))
    x = jax.jit(lambda: jnp.ones((len(devices), n, n), dtype), out_shardings=at)()
    product = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a), out_shardings=at)
    product(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(x).block_until_ready()  # this process's devices; the others time theirs alike
        best = min(best, time.perf_counter() - start)
    return 2 * len(devices) * n**3 / best


def peak_devices(devices) -> list:
    """The devices of this process whose peak bounds a step on `devices`: its GPUs or TPUs
    among them; on a CPU its first, the real device, whose cores every fake device shares (one
    matmul a fake device, over 8 of them at once, measured no faster than one device's)."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    return local[:1] if local[0].platform == "cpu" else local


_PEAKS: dict[tuple, float] = {}  # this process's figures, by (its peak devices, dtype)
PEAKS_FILE = "peaks.json"  # the best figure any run measured, by machine (`_machine`)


def peak_flops_per_s(devices, dtype, *, at_least: float = 0.0) -> float:
    """The peak of `devices` working together for a step computing in `dtype`: the faster of
    `dtype` and float32 matmuls on this process's `peak_devices`, times the processes (hosts
    alike). Measured once per process, and again when a step was seen to reach `at_least`
    FLOP/s, above it: the peak was then measured while other work slowed the machine. Each
    measurement and each step's rate is a floor of what the hardware does, so the peak is the
    highest of them, and the highest any earlier run measured on the same machine (kept in
    ${MISTRAL_JAX_CACHE:-~/.cache/mistral_jax}/peaks.json): no step's MFU exceeds 1, and a
    run measured on a busy machine still divides by what the machine can do."""
    local = peak_devices(devices)
    processes, name = len({d.process_index for d in devices}), jnp.dtype(dtype).name
    key, floor = (tuple(local), name), at_least / processes
    if key not in _PEAKS or _PEAKS[key] < floor:
        sizes = SIZES.get(local[0].platform, ACCELERATOR_SIZES)
        best = {d: max(matmul_flops_per_s(local, d, n, runs) for n, runs in sizes)
                for d in dict.fromkeys([name, "float32"])}
        best[name] = max(best[name], floor, _PEAKS.get(key, 0.0))
        _PEAKS[key] = max(_remember(_machine(local, d), rate) for d, rate in best.items())
    return processes * _PEAKS[key]


def _machine(local, dtype: str) -> str:
    """What a best rate belongs to: the devices' kind and number, the CPU (model, features) and
    the cores this process may use, JAX's version (XLA's kernels), the dtype (a float32 record
    serves the peak of every dtype, as a float32 matmul does)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = platform.processor()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    features = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", info, re.MULTILINE)
    features = hashlib.sha256((features.group(1) if features else info).encode()).hexdigest()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{local[0].platform} {local[0].device_kind} x{len(local)}; "
            f"{model.group(1) if model else platform.machine()} ({features[:12]}), {cores} "
            f"cores; jax {jax.__version__}; {dtype}")


def _remember(machine: str, peak: float) -> float:
    """The highest peak measured on `machine` by this or any earlier run."""
    path = Path(os.environ.get("MISTRAL_JAX_CACHE") or Path.home() / ".cache/mistral_jax")
    path = path / PEAKS_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if peak <= known.get(machine, 0.0):
        return known[machine]
    known[machine] = peak
    try:  # written whole or not at all (another process may write it at the same time)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{PEAKS_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: this process's figure holds
    return peak


def training_flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per token of a step training every weight on rows of `seq_len` tokens of one
    causal document each (what bench/train.py feeds)."""
    pairs = attention_pairs(np.zeros((1, seq_len), np.int32), config.sliding_window, True)
    return training_flops(config).of(seq_len, pairs) / seq_len
