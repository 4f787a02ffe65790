"""Fine-tune a checkpoint as a causal language model on a ("data", "fsdp", "model") device mesh.

    python -m train.finetune --mesh 1x8                      # the embedded default run
    python -m train.finetune --mesh 2x4 --init ckpt/ --data train.jsonl --out run/
    python -m train.finetune --mesh 2x4 --init ckpt/ --data train.jsonl --out run/ --resume

With no --init and no --data it trains a small Mistral on The Devil's Dictionary (shipped in
train/corpus) for a few minutes. OUT receives checkpoints/ (Orbax, for --resume), metrics.jsonl,
loss.png and, at the end, final/ (a checkpoint `python -m mistral_jax.generate` loads).
On a CPU, --mesh auto is the one real CPU device; a mesh of more devices than there are is
made of fake CPU devices (XLA_FLAGS), which show tensor parallelism but run slower.
Multi-host: start one process per host with --coordinator, --num-processes and --process-id.
From Python: `from train.api import finetune` takes these flags as keyword arguments.
"""

from __future__ import annotations

import argparse
import sys

from train import api
from train.run import flags


def parser() -> argparse.ArgumentParser:
    return flags.parser("finetune", __doc__)


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    return flags.with_defaults(args, "finetune")


def main(argv=None) -> int:
    return api.main("finetune", parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
