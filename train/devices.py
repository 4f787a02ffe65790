"""Devices before JAX starts: fake CPU devices for a mesh larger than the machine, and JAX's own
multi-controller runtime (`jax.distributed`) for multi-host runs.

XLA reads `--xla_force_host_platform_device_count` when its CPU backend starts, so `prepare`
must run before anything touches `jax.devices()`; importing this module does not import JAX.
"""

from __future__ import annotations

import os
import re

FLAG = "--xla_force_host_platform_device_count"


def prepare(devices_per_process: int) -> str | None:
    """Ask XLA for `devices_per_process` CPU devices unless XLA_FLAGS already sets a count;
    return what was set (for the message), or None. A GPU or TPU backend ignores the flag."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags or devices_per_process <= 1:
        return None
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={devices_per_process}".strip()
    return f"XLA_FLAGS={FLAG}={devices_per_process}"


def fake_cpu_count() -> int | None:
    m = re.search(rf"{FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else None


def initialize_distributed(coordinator: str | None, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize` for a multi-process run (gloo collectives on CPU)."""
    if num_processes <= 1:
        return
    import jax

    if os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def mesh_devices(data: int, model: int):
    """The devices a DxT mesh uses: all of them, or (one process) the first D*T."""
    import jax

    from mistral_jax.sharding import ShardingError

    devices = jax.devices()
    needed = data * model
    if len(devices) < needed or (len(devices) > needed and jax.process_count() > 1):
        raise ShardingError(f"--mesh {data}x{model} needs {needed} devices but "
                            f"{len(devices)} {devices[0].platform} devices are available")
    return devices[:needed]
