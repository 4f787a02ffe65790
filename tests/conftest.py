"""Test set-up: 8 fake CPU devices, set before JAX starts. Matmul precision stays JAX's default,
what users get: the parity tests hold at it on a CPU."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
