"""Which devices a `--mesh` runs on: `--mesh auto` on a CPU is the one real device and makes no
fake ones, a mesh of more devices makes them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, os, sys
from mistral_jax import configs, devices
devices.prepare(sys.argv[1])  # as every command line does, before JAX starts
import jax
mesh, said = devices.mesh_for(sys.argv[1], configs.preset("mistral-tiny"))
print(json.dumps({"devices": jax.device_count(), "mesh": dict(mesh.shape), "said": said,
                  "xla_flags": os.environ.get("XLA_FLAGS")}))
"""


def user_env():
    """A user's shell: no XLA_FLAGS (tests/conftest.py sets 8 devices for this process only)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def probe(spec: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, spec], env=user_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_auto_on_a_cpu_is_the_one_real_device_and_makes_no_fake_ones():
    got = probe("auto")
    assert got["xla_flags"] is None and got["devices"] == 1
    assert got["mesh"] == {"data": 1, "model": 1}
    assert got["said"].startswith("--mesh auto: 1x1 (the one CPU device; ")


def test_a_mesh_of_more_devices_than_the_cpu_has_makes_fake_ones():
    got = probe("2x4")
    assert got["devices"] == 8 and got["mesh"] == {"data": 2, "model": 4}
    assert got["said"] == ("--mesh 2x4: 8 CPU devices (--xla_force_host_platform_device_count=8 "
                           "in XLA_FLAGS)")
