"""Devices for the command lines: fake CPU devices for a mesh larger than the machine (set
before JAX starts), JAX's own multi-controller runtime (`jax.distributed`) for multi-host runs,
and a `--mesh` value turned into a mesh that fits both the devices and the model.

XLA reads `--xla_force_host_platform_device_count` when its CPU backend starts, so `prepare`
must run before anything touches `jax.devices()`; importing this module does not import JAX.
"""

from __future__ import annotations

import os
import re

FLAG = "--xla_force_host_platform_device_count"
AUTO = "auto"
AUTO_CPU_DEVICES = 8  # what `--mesh auto` spreads over on a CPU: fake devices, as in the tests


def parse(spec: str) -> tuple[int, int] | None:
    """"DxT" -> (D, T); "auto" -> None."""
    from mistral_jax.sharding import parse_mesh

    return None if spec == AUTO else parse_mesh(spec)


def prepare(spec: str | None, num_processes: int = 1) -> None:
    """Before JAX starts: ask XLA for as many CPU devices as the mesh `spec` needs (split over
    `num_processes`), unless XLA_FLAGS already sets a count. A GPU or TPU backend ignores it."""
    if spec is None:
        return
    shape = parse(spec)
    count = AUTO_CPU_DEVICES if shape is None else shape[0] * shape[1]
    flags = os.environ.get("XLA_FLAGS", "")
    per_process = count // num_processes
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


def fitting_model_axes(config, devices: int) -> list[int]:
    """Every T that divides `devices` and splits `config` the Megatron way, largest first."""
    from mistral_jax.sharding import ShardingError, check_layout

    fits = []
    for t in range(devices, 0, -1):
        if devices % t == 0:
            try:
                check_layout(config, t)
            except ShardingError:
                continue
            fits.append(t)
    return fits


def mesh_for(spec: str | None, config, *, flag: str = "--mesh"):
    """(the mesh `spec` asks for, checked against `config`, or None for one device; a note on
    what was chosen for the user, or None).

    "auto" takes every device with the largest model axis that fits the model (the rest goes to
    data). A mesh that does not fit the model is an error that names a mesh that would.
    """
    import jax

    from mistral_jax.sharding import ShardingError, check_layout, make_mesh

    if spec is None:
        return None, None
    shape, available = parse(spec), jax.device_count()
    said = []
    if shape is None:
        model = fitting_model_axes(config, available)[0]
        spec = f"{available // model}x{model}"
        said.append(f"{flag} auto: {spec} ({available // model}-way data, {model}-way tensor "
                    f"parallel over {available} {jax.devices()[0].platform} devices)")
    else:
        try:
            check_layout(config, shape[1])
        except ShardingError as e:
            fits = fitting_model_axes(config, shape[0] * shape[1])
            hint = f"; {flag} {shape[0] * shape[1] // fits[0]}x{fits[0]} fits" if fits else ""
            raise ShardingError(f"{flag} {spec}: {e}{hint}") from None
    mesh = make_mesh(spec)
    if mesh.devices.flat[0].platform == "cpu" and mesh.size > 1 and fake_cpu_count() \
            and shape is not None:
        said.append(f"{flag} {spec}: {mesh.size} CPU devices ({FLAG}={fake_cpu_count()} in "
                    "XLA_FLAGS)")
    return mesh, "; ".join(said) or None


def fake_cpu_count() -> int | None:
    m = re.search(rf"{FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else None
