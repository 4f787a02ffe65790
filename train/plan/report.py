"""What a plan says about a compiled program, per device: XLA's memory accounting
(`memory_analysis()`), its FLOPs (`cost_analysis()`), each collective in the compiled HLO with its
bytes, the step time at a stated MFU (an estimate, from the model FLOPs and the chip's peak), and
one verdict line.

The bytes a device needs are XLA's: arguments + outputs - aliased (the donated state is written
in place, so its outputs take no more) + temporaries. The compiled code is left out (kilobytes
to a few MB). A collective's bytes are its largest buffer on one device (the full array of an
all-gather, the input of a reduce-scatter): what crosses the links is of that order. A
collective in the body of a loop (the scan over layers) runs once per trip; the HLO text holds
it once, and it is listed as "in a loop".
"""

from __future__ import annotations

import re
from collections import Counter

from mistral_jax.parallel.sharding import COLLECTIVES, count_collectives

GiB = 2**30
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
          "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def size(n: float) -> str:
    """Bytes in the largest unit that keeps a whole number in front: 1.50 KiB, 7.02 GiB."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    out["needed"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def program_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def collectives(hlo: str) -> list[tuple[str, int, bool, int]]:
    """(op, bytes, in a loop, how many) for each kind of collective in compiled HLO text; the
    counts add up to `sharding.count_collectives`'."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    seen: Counter = Counter()
    computation = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) [(\[{]", line)
        if head and not line.startswith(" "):
            computation = head.group(1)
        op = _OP.search(line)
        if op is None or "-done(" in line:
            continue
        sizes = [_BYTES[d] * _product(dims) for d, dims in _SHAPE.findall(line[:op.end() + 400])]
        seen[(op.group(1), max(sizes, default=0), computation in bodies)] += 1
    return [(op, size, loop, n) for (op, size, loop), n in sorted(seen.items())]


def _product(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def refusal(message: str, chip, devices: int, model_flops: float | None, mfu: float,
            parts: dict[str, int]) -> list[str]:
    """The report of a program the TPU compiler would not compile: it did not fit."""
    out = ["per device: " + ", ".join(f"{k} {size(v)}" for k, v in parts.items())
           + f" (inputs; {size(sum(parts.values()))} in all)"]
    out += _estimate(chip, devices, model_flops, mfu)
    out.append(f"does not fit: the TPU compiler refused the program against {chip.hbm_said} "
               f"of HBM: {message}")
    return out


def _estimate(chip, devices: int, model_flops: float | None, mfu: float) -> list[str]:
    if model_flops is None:
        return []
    if not chip.peak:
        return [f"step time: not estimated ({model_flops:.4g} model FLOPs; a CPU has no "
                "published peak)"]
    seconds = model_flops / (devices * chip.peak * mfu)
    return [f"step time: {seconds:.3g} s at {mfu:.0%} MFU (an estimate: {model_flops:.4g} "
            f"model FLOPs / ({devices} x {chip.peak / 1e12:g} TFLOP/s x {mfu:g}))"]


def lines(compiled, chip, devices: int, model_flops: float | None, mfu: float,
          parts: dict[str, int]) -> list[str]:
    """The report's lines, the verdict last."""
    mem = memory(compiled)
    out = ["per device (XLA's memory analysis of the compiled program):"]
    said = {"arguments": "inputs: " + ", ".join(f"{k} {size(v)}" for k, v in parts.items()),
            "outputs": "the new state and the metrics", "aliased": "outputs written over "
            "their donated inputs", "temporaries": "activations, gradients, workspace"}
    for key in ("arguments", "outputs", "aliased", "temporaries"):
        out.append(f"  {key:<12} {mem[key]:>16,} bytes {size(mem[key]):>11}  ({said[key]})")
    out.append(f"  {'needed':<12} {mem['needed']:>16,} bytes {size(mem['needed']):>11}  "
               "(arguments + outputs - aliased + temporaries)")
    xla_flops = program_flops(compiled)
    out.append(f"FLOPs per step on a device: {xla_flops:.4g} (XLA's cost analysis; "
               f"{xla_flops * devices:.4g} on all {devices})")
    hlo = compiled.as_text()
    found = collectives(hlo)
    out.append(f"collectives in the compiled program ({sum(count_collectives(hlo).values())}):"
               + ("" if found else " none"))
    for op, nbytes, loop, n in found:
        out.append(f"  {op:<18} x{n:<3} {size(nbytes):>11} each"
                   + ("  (in a loop: once per trip)" if loop else ""))
    out += _estimate(chip, devices, model_flops, mfu)
    limit = chip.hbm
    said_limit = f"{chip.hbm_said} ({gib(limit)})" if chip.hbm_said else size(limit)
    what = "HBM" if chip.hbm_said else "this machine's memory / devices"
    verdict = "fits" if mem["needed"] <= limit else "does not fit"
    out.append(f"{verdict}: {size(mem['needed'])} per device against {said_limit} of {what}")
    return out
