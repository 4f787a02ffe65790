"""A run's checkpoints: Orbax `CheckpointManager` under OUT/checkpoints/STEP, written
asynchronously (training goes on while the arrays are written), the last N kept.

Each holds the `TrainState` (trained weights, optimizer state, step, RNG key) and a small JSON
record (data position, data fingerprint). Orbax writes a step to a temporary directory and
renames it when every file is complete, so a run killed in the middle of a save leaves the
previous checkpoint as the latest one; the half-written directory is ignored, then removed.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"


class RunCheckpoints:
    def __init__(self, out: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               cleanup_tmp_directories=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(Path(out).absolute() / CHECKPOINTS, options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, record: dict) -> None:
        """Start writing (returns once the arrays are copied off the devices)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)

    def restore(self, step: int, like):
        """(state laid out as `like`, an abstract or concrete TrainState; the JSON record)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
        return got.state, got.record

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def saved_steps(out: Path) -> list[int]:
    """The steps of the complete checkpoints in OUT/checkpoints, in order."""
    directory = Path(out) / CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def has_checkpoints(out: Path) -> bool:
    return bool(saved_steps(out))
