"""Which devices a `--mesh` runs on: `--mesh auto` on a CPU is the one real device and makes no
fake ones, a mesh of more devices makes them; a mesh that cannot run is refused with one that
passes every check the run makes (devices, model, batch), or with the news that none does."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mistral_jax
from mistral_jax.arch import configs
from mistral_jax.parallel import devices
from mistral_jax.parallel.sharding import MeshShape, ShardingError
from mistral_jax.text.tokenizer import Tokenizer
from tests.fetch import byte_level_bpe
from train import finetune
from train.input import default
from train.run import loop

ROOT = Path(__file__).resolve().parents[1]
# 8 heads, 2 kv heads, MLP 64: a model axis of 1, 2, 4 or 8 splits it, 3 does not.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=2, head_dim=4, sliding_window=None, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=1)

PROBE = """
import json, os, sys
from mistral_jax.arch import configs
from mistral_jax.parallel import devices
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
    assert got["mesh"] == {"data": 1, "fsdp": 1, "model": 1}
    assert got["said"].startswith("--mesh auto: 1x1 (the one CPU device; ")


def test_a_mesh_of_more_devices_than_the_cpu_has_makes_fake_ones():
    got = probe("2x4")
    assert got["devices"] == 8 and got["mesh"] == {"data": 2, "fsdp": 1, "model": 4}
    assert got["said"] == ("--mesh 2x4: 8 CPU devices (--xla_force_host_platform_device_count=8 "
                           "in XLA_FLAGS)")


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("meshes")
    text = default.CORPUS.read_text()
    bpe = byte_level_bpe(default.entries(text[:20000]), 300, ["<s>", "</s>"])
    tokenizer = Tokenizer(bpe.to_str().encode(), "hf", "test-bpe")
    config = configs.MistralConfig(vocab_size=tokenizer.vocab_size, **TINY)
    mistral_jax.save(mistral_jax.init(config, tokenizer=tokenizer), d / "ckpt")
    (d / "train.txt").write_text(text[:3000])
    return d


def flags(files: Path, out: Path, *extra: str) -> list[str]:
    return ["--init", str(files / "ckpt"), "--data", str(files / "train.txt"), "--out", str(out),
            "--steps", "1", "--seq-len", "32", "--batch-size", "8", *extra]


def suggested(message: str) -> str:
    """The mesh an error names, "DxT"."""
    m = re.search(r"; --mesh (\d+x\d+) fits$", message)
    assert m, message
    return m.group(1)


def test_3x3_is_refused_with_a_mesh_that_runs(run_files, tmp_path):
    """As a user runs it (9 fake devices made): 3 does not split 8 heads, and 9x1 does not split
    a batch of 8, so the mesh named is 1x8, and a run on it trains."""
    argv = flags(run_files, tmp_path / "out", "--mesh", "3x3")
    proc = subprocess.run([sys.executable, "-m", "train.finetune", *argv], env=user_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == ("error: --mesh 3x3: num_attention_heads=8 is not divisible by the "
                           "model axis 3; use a mesh whose T divides 8; --mesh 1x8 fits\n")
    assert not (tmp_path / "out").exists()
    argv[argv.index("3x3")] = suggested(proc.stderr.strip())
    assert finetune.main(argv) == 0
    assert (tmp_path / "out" / "final").is_dir()


@pytest.mark.parametrize("extra, problem, mesh", [
    (["--mesh", "1x3"], "num_attention_heads=8 is not divisible by the model axis 3", "1x2"),
    (["--mesh", "8x1", "--batch-size", "4"], "a micro-batch of 4 rows (--batch-size / "
     "--grad-accum) does not split over the mesh's 8 data-parallel replicas (D x F)", "1x8"),
    (["--mesh", "2x4", "--batch-size", "6", "--grad-accum", "2"], "a micro-batch of 3 rows",
     "1x8"),
    (["--mesh", "1x3x1"], "hidden size 32 is not divisible by the fsdp axis 3", "1x2"),
    (["--mesh", "1x4x2", "--batch-size", "4", "--grad-accum", "2"], "a micro-batch of 2 rows "
     "(--batch-size / --grad-accum) does not split over the mesh's 4 data-parallel replicas "
     "(D x F)", "1x8"),
], ids=["model axis", "data axis", "micro-batch", "fsdp axis", "fsdp batch"])
def test_a_refused_mesh_names_one_that_passes_every_check(run_files, tmp_path, extra, problem,
                                                          mesh):
    """1x3 used to be answered with 3x1, which a batch of 8 does not split either."""
    args = finetune.with_defaults(finetune.parser().parse_args(
        flags(run_files, tmp_path / "out", *extra)))
    with pytest.raises(ShardingError) as refused:
        loop.set_up(args)
    message = str(refused.value)
    assert message.startswith(f"{args.mesh.join(['--mesh ', ': '])}{problem}")
    assert "\n" not in message and suggested(message) == mesh
    args.mesh = mesh
    assert dict(loop.set_up(args).mesh.shape) == devices.parse(mesh)._asdict()


def test_no_mesh_fits_says_so():
    """A multi-process mesh takes every device: 9 heads on 8 devices leave only 8x1, which a
    micro-batch of 4 does not split."""
    nine = configs.MistralConfig(vocab_size=300, **{**TINY, "num_attention_heads": 9,
                                                    "num_key_value_heads": 3,
                                                    "intermediate_size": 72})
    assert devices.mesh_problem(nine, MeshShape(4, 1, 2), 8, True, 4) == (
        "num_attention_heads=9 is not divisible by the model axis 2; use a mesh whose T "
        "divides 9")
    assert devices.suggestion(nine, 8, 8, True, 4) == (
        "no mesh over all 8 devices fits this model and a micro-batch of 4 rows; change "
        "--batch-size or --grad-accum")
    assert devices.suggestion(nine, 8, 8, True, 8) == "--mesh 8x1 fits"
    assert devices.suggestion(nine, 8, 8, False, 4) == "--mesh 2x3 fits"  # fewer devices
