"""Devices for the command lines: which devices `--mesh` runs on, fake CPU devices only for a
mesh of more CPU devices than there are (set before JAX starts), JAX's own multi-controller
runtime (`jax.distributed`) for multi-host runs, and a `--mesh` value turned into a mesh that
fits the devices, the model and the batch.

On a CPU, `--mesh auto` is the real device: XLA's CPU client is one device per process, whose
programs use every core. Fake devices (`--xla_force_host_platform_device_count`) split those
same cores into programs that run side by side and exchange copies, which costs time and memory
on a small CPU; they exist to show and test tensor parallelism (`--mesh 1x8`), and are made only
when a mesh asks for more devices than the process has. On GPUs and TPUs, auto takes every
device. XLA reads the flag when its CPU backend starts, so `prepare` must run before anything
touches `jax.devices()`; importing this module does not import JAX.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator

FLAG = "--xla_force_host_platform_device_count"
AUTO = "auto"


def parse(spec: str):
    """"DxT" or "DxFxT" -> `MeshShape` (D, F, T); "auto" -> None."""
    from mistral_jax.parallel.sharding import parse_mesh

    return None if spec == AUTO else parse_mesh(spec)


def prepare(spec: str | None, num_processes: int = 1) -> None:
    """Before JAX starts: for a mesh "DxT" / "DxFxT" of more than one device per process, ask
    XLA for D*F*T / `num_processes` CPU devices in each process (fake ones: a CPU is one
    device), unless XLA_FLAGS already sets a count. "auto" and None ask for none. GPU and TPU
    backends ignore the flag."""
    shape = None if spec is None else parse(spec)
    if shape is None:
        return
    per_process = math.prod(shape) // num_processes
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags or per_process <= 1:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={per_process}".strip()


def initialize_distributed(coordinator: str | None, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize` for a multi-process run (gloo collectives on CPU)."""
    if num_processes <= 1:
        return
    import jax

    if os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def real_devices() -> list:
    """The devices `--mesh auto` runs on: every GPU or TPU; on a CPU, each process's one real
    device (the first, whatever fake ones XLA_FLAGS made)."""
    import jax

    devices = jax.devices()
    if devices[0].platform != "cpu":
        return devices
    first = {}
    for device in devices:
        first.setdefault(device.process_index, device)
    return list(first.values())


def fitting_model_axes(config, devices: int) -> list[int]:
    """Every T that divides `devices` and splits `config` the Megatron way, largest first."""
    from mistral_jax.parallel.sharding import ShardingError, check_layout

    fits = []
    for t in range(devices, 0, -1):
        if devices % t == 0:
            try:
                check_layout(config, t)
            except ShardingError:
                continue
            fits.append(t)
    return fits


def fitting_meshes(config, counts: Iterable[int],
                   micro_batch: int | None = None) -> Iterator[tuple[int, int]]:
    """Every (D, T) with D * T in `counts` (in that order; largest T first within a count)
    that passes every check a mesh meets: T splits `config` the Megatron way, and D divides
    `micro_batch` (the rows of a training micro-batch, when given)."""
    for count in counts:
        for t in fitting_model_axes(config, count):
            if micro_batch is None or micro_batch % (count // t) == 0:
                yield count // t, t


def mesh_problem(config, shape, available: int, multi_process: bool,
                 micro_batch: int | None = None, platform: str = "cpu") -> str | None:
    """What stops the mesh `shape` (a `MeshShape`: D, F, T) from running, or None: the devices,
    the model, the batch, checked in that order."""
    from mistral_jax.parallel.sharding import ShardingError, check_layout

    data, fsdp, model = shape
    needed = data * fsdp * model
    if needed > available or (multi_process and needed != available):
        return (f"needs {needed} devices and {available} {platform} devices are there"
                + ("; a multi-process mesh takes every process's devices" if multi_process
                   else ""))
    try:
        check_layout(config, model, fsdp)
    except ShardingError as e:
        return str(e)
    if micro_batch is not None and micro_batch % (data * fsdp):
        return (f"a micro-batch of {micro_batch} rows (--batch-size / --grad-accum) does not "
                f"split over the mesh's {data * fsdp} data-parallel replicas (D x F)")
    return None


def suggestion(config, wanted: int, available: int, multi_process: bool,
               micro_batch: int | None = None, flag: str = "--mesh") -> str:
    """A mesh that passes every check, said as a flag: of `wanted` devices when one fits,
    else of the most devices below that (a multi-process mesh takes every device); or that
    there is none."""
    counts = [available] if multi_process else range(min(wanted, available), 0, -1)
    found = next(fitting_meshes(config, counts, micro_batch), None)
    if found is not None:
        return f"{flag} {found[0]}x{found[1]} fits"
    what = "this model" + (f" and a micro-batch of {micro_batch} rows"
                           if micro_batch is not None else "")
    change = "; change --batch-size or --grad-accum" if micro_batch is not None else ""
    return f"no mesh over all {available} devices fits {what}{change}"


def mesh_for(spec: str | None, config, *, flag: str = "--mesh", micro_batch: int | None = None):
    """(the mesh `spec` asks for, checked against `config`, or None for one device; a note on
    what was chosen for the user, or None).

    "auto" is the real devices (`real_devices`) with the largest model axis that fits the model
    (the rest goes to data). A mesh that cannot run (too many devices, a model axis that does
    not split the model, a data axis that does not split `micro_batch`) is an error that names
    a mesh that passes all of these checks, or says there is none.
    """
    import jax

    from mistral_jax.parallel.sharding import ShardingError, make_mesh

    if spec is None:
        return None, None
    shape = parse(spec)
    if shape is None:
        return _auto(config, flag, micro_batch)
    available, multi = jax.device_count(), jax.process_count() > 1
    problem = mesh_problem(config, shape, available, multi, micro_batch,
                           jax.devices()[0].platform)
    if problem:
        hint = suggestion(config, math.prod(shape), available, multi, micro_batch, flag)
        raise ShardingError(f"{flag} {spec}: {problem}; {hint}")
    mesh = make_mesh(spec)
    note = None
    if mesh.devices.flat[0].platform == "cpu" and mesh.size > 1 and fake_cpu_count():
        note = f"{flag} {spec}: {mesh.size} CPU devices ({FLAG}={fake_cpu_count()} in XLA_FLAGS)"
    return mesh, note


def _auto(config, flag: str, micro_batch: int | None):
    import jax

    from mistral_jax.parallel.sharding import ShardingError, make_mesh

    devices = real_devices()
    multi, platform = jax.process_count() > 1, devices[0].platform
    counts = [len(devices)] if multi else range(len(devices), 0, -1)
    found = next(fitting_meshes(config, counts, micro_batch), None)
    if found is None:
        raise ShardingError(f"{flag} auto: " + suggestion(config, len(devices), len(devices),
                                                          multi, micro_batch, flag))
    data, model = found
    spec = f"{data}x{model}"
    mesh = make_mesh(spec, devices[:data * model])
    if platform == "cpu" and not multi:
        return mesh, (f"{flag} auto: {spec} (the one CPU device; a larger {flag} makes fake "
                      "CPU devices, which share its cores and run slower)")
    of = f" of the {len(devices)}" if data * model < len(devices) else ""
    return mesh, (f"{flag} auto: {spec} ({data}-way data, {model}-way tensor parallel over "
                  f"{data * model}{of} {platform} devices"
                  + (", one per process)" if platform == "cpu" else ")"))


def fake_cpu_count() -> int | None:
    m = re.search(rf"{FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else None
