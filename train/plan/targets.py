"""What `--topology` names: the devices a plan compiles for and what each chip holds and does.

A TPU slice comes from libtpu's compile-only client (`jax.experimental.topologies`): devices
that can be compiled for and never run, on any machine, as MaxText's train_compile does. libtpu
is installed apart from the project's site-packages (scripts/setup.sh puts it in .venv/libtpu),
because a libtpu that JAX can import makes every JAX start print five lines of TPU-runtime
warnings on stderr (measured: `python -c "import jax; print(jax.devices())"` with and without
it on the PYTHONPATH, 2-core CPU machine); only train.plan points JAX at it (TPU_LIBRARY_PATH).

Fake CPU devices (`cpu:N`) are XLA's host-platform device count, set before JAX starts; their
memory is the machine's, shared by all N.

Chip figures are Google's Cloud TPU pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): peak
bf16 compute and HBM per chip. The pages write v4's HBM in GiB and the others' in GB; each is
taken as written, so the verdict never counts on memory the page does not promise. A slice name
counts chips for v5e and v6e (v5e-8: 8 chips) and TensorCores for v4 and v5p (v5p-8: 4 chips of
2 cores, each chip one JAX device: "megacore"); its chip grid is the documented shape.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

LIBTPU = "libtpu==0.0.42.1"  # the libtpu jax 0.10.2's [tpu] extra pins (pyproject's `plan`)
GiB = 2**30


class TargetError(ValueError):
    """A --topology that cannot be compiled for; the message names the flag."""


@dataclass(frozen=True)
class Chip:
    generation: str  # v4, v5e, v5p, v6e, cpu
    platform: str  # libtpu's name for the generation in a topology ("v5" is v5p)
    hbm: float  # bytes per chip, as Google's page says it
    hbm_said: str
    peak: float | None  # bf16 FLOP/s per chip
    cores_in_name: bool  # v4-8 and v5p-8 count TensorCores (2 per chip), v5e-8 chips
    grids: dict  # chips -> the slice's chip grid


_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
CHIPS = {
    "v4": Chip("v4", "v4", 32 * GiB, "32 GiB", 275e12, True, _GRID_3D),
    "v5e": Chip("v5e", "v5e", 16e9, "16 GB", 197e12, False, _GRID_2D),
    "v5p": Chip("v5p", "v5", 95e9, "95 GB", 459e12, True, _GRID_3D),
    "v6e": Chip("v6e", "v6e", 32e9, "32 GB", 918e12, False, _GRID_2D),
}


@dataclass(frozen=True)
class Target:
    name: str  # as given: v5e-8, cpu:8
    chip: Chip
    count: int  # devices (chips)
    grid: str | None  # the TPU chip grid, e.g. 2x4; None for CPU

    @property
    def is_tpu(self) -> bool:
        return self.grid is not None

    def describe(self) -> str:
        if not self.is_tpu:
            return (f"{self.name}: {self.count} fake CPU devices sharing this machine's "
                    f"{self.chip.hbm * self.count / GiB:.1f} GiB of memory")
        return (f"{self.name}: {self.count} TPU {self.chip.generation} chips ({self.grid}), "
                f"{self.chip.hbm_said} HBM and {self.chip.peak / 1e12:g} bf16 TFLOP/s each "
                "(Google's figures); compiled by libtpu's compile-only client")


def parse(text: str) -> Target:
    """`--topology` as a Target: v5e-8, v5p-64, v4-8, v6e-8, ... or cpu:N."""
    cpu = re.fullmatch(r"cpu:(\d+)", text)
    if cpu and int(cpu.group(1)) > 0:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        chip = Chip("cpu", "cpu", memory / int(cpu.group(1)), "", None, False, {})
        return Target(text, chip, int(cpu.group(1)), None)
    tpu = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", text)
    known = ", ".join(f"{g}-{n * (2 if c.cores_in_name else 1)}" for g, c in CHIPS.items()
                      for n in list(c.grids)[:3])
    if not tpu:
        raise TargetError(f"--topology {text!r}: a TPU slice (e.g. {known}, ...) or cpu:N "
                          "(N fake CPU devices)")
    chip, n = CHIPS[tpu.group(1)], int(tpu.group(2))
    chips = n // 2 if chip.cores_in_name else n
    if chips not in chip.grids or (chip.cores_in_name and n % 2):
        sizes = ", ".join(f"{chip.generation}-{c * (2 if chip.cores_in_name else 1)}"
                          for c in chip.grids)
        raise TargetError(f"--topology {text}: not a {chip.generation} slice shape this knows; "
                          f"known: {sizes}")
    return Target(text, chip, chips, chip.grids[chips])


def libtpu_path() -> str | None:
    """libtpu.so: TPU_LIBRARY_PATH, else the copy setup.sh installs in .venv/libtpu, else an
    importable libtpu package (found, not imported)."""
    if os.environ.get("TPU_LIBRARY_PATH"):
        return os.environ["TPU_LIBRARY_PATH"]
    apart = Path(sys.prefix) / "libtpu" / "libtpu" / "libtpu.so"
    if apart.is_file():
        return str(apart)
    import importlib.util

    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        found = Path(list(spec.submodule_search_locations)[0]) / "libtpu.so"
        return str(found) if found.is_file() else None
    return None


def prepare(target: Target) -> None:
    """Before JAX starts: the fake CPU devices a cpu:N target needs, or libtpu for a TPU one
    (with the TPU runtime's variables set so that it does not look for TPU hosts, and JAX's
    own backend kept on the CPU: nothing runs on a TPU)."""
    if not target.is_tpu:
        from mistral_jax.parallel.devices import FLAG, fake_cpu_count

        have = fake_cpu_count()
        if have is None and target.count > 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + f" {FLAG}={target.count}").strip()
        elif (have or 1) < target.count:
            raise TargetError(f"--topology {target.name}: XLA_FLAGS already asks for {have} CPU "
                              f"devices ({FLAG}); unset it or ask for cpu:{have} or fewer")
        return
    path = libtpu_path()
    if path is None:
        raise TargetError(f"--topology {target.name} needs libtpu ({LIBTPU}), which is not "
                          "installed: scripts/setup.sh installs it in .venv/libtpu (or: "
                          f".venv/bin/pip install --target .venv/libtpu '{LIBTPU}')")
    os.environ["TPU_LIBRARY_PATH"] = path
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # libtpu takes /tmp/libtpu_lockfile, one process a machine, unless told more may load it:
    # two plans at once (pytest's workers, a bench beside a command) otherwise fail
    for name, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                        ("TPU_WORKER_ID", "0"),
                        ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_ACCELERATOR_TYPE", target.name.replace("v5e", "v5litepod"))):
        os.environ.setdefault(name, value)


def devices(target: Target) -> list:
    """The target's devices (after `prepare`)."""
    import jax

    if not target.is_tpu:
        cpus = jax.devices("cpu")
        if len(cpus) < target.count:
            raise TargetError(f"--topology {target.name}: JAX started with {len(cpus)} CPU "
                              "devices before train.plan could ask for more")
        return cpus[:target.count]
    from jax.experimental import topologies

    chip = target.chip
    megacore = {"chip_config_name": "megacore"} if chip.cores_in_name else {}
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{chip.platform}:{target.grid}", **megacore)
    return list(topology.devices)
