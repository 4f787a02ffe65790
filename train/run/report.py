"""What a person sees of a run: a progress line, OUT/metrics.jsonl, TensorBoard events (when
tensorboardX, or torch with tensorboard, is installed) and OUT/loss.png at the end."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

METRICS, PLOT, TENSORBOARD = "metrics.jsonl", "loss.png", "tensorboard"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """One line per logged step: rewritten in place on a terminal, appended otherwise."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.since: tuple[int, float] | None = None

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None) -> None:
        now = time.perf_counter()
        if self.since is None:  # the first step includes compilation: time from its end
            self.since = (step, now)
        done, elapsed = step - self.since[0], now - self.since[1]
        eta = elapsed / done * (self.total - step) if done else float("nan")
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        mfu_text = f" | MFU {100 * mfu:4.1f}%" if mfu is not None else ""
        line = (f"[{bar}] step {step}/{self.total} | loss {loss:.4f} | "
                f"{tokens_per_s:,.0f} tok/s{mfu_text} | ETA "
                f"{_duration(eta) if math.isfinite(eta) else '?'}")
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, not overwritten by the next update."""
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


class Metrics:
    """Appends one JSON object per logged step to OUT/metrics.jsonl (and to TensorBoard)."""

    def __init__(self, out: Path):
        self.path = out / METRICS
        self.board = _tensorboard_writer(out / TENSORBOARD)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, int | float):
                    self.board.add_scalar(name, value, row["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _tensorboard_writer(directory: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            import tensorboard  # noqa: F401  (torch's writer needs it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(str(directory))


def truncate_metrics(out: Path, step: int) -> None:
    """Forget rows after `step` (a resumed run logs those steps again)."""
    rows = [r for r in read_metrics(out) if r["step"] <= step]
    (out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_loss(out: Path, ylabel: str = "cross-entropy (nats / token)") -> Path | None:
    """OUT/loss.png: training loss by step, eval loss as points."""
    rows = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    try:
        import matplotlib
    except ImportError:  # a dependency, but an old environment may lack it: skip the picture
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOT)
    plt.close(fig)
    return out / PLOT
