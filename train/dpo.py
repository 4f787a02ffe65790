"""Preference tuning (DPO, or IPO) of a checkpoint on pairs of responses, one preferred, on a
("data", "fsdp", "model") device mesh: the fine-tuning run's loop, flags, checkpoints and outputs.

    python -m train.dpo --init ckpt/ --data prefs.jsonl --out dpo-run/
    python -m train.dpo --init ckpt/ --data prefs.jsonl --out dpo-run/ --lora-rank 8 --beta 0.1
    python -m train.dpo --init ckpt/ --data prefs.jsonl --out dpo-run/ --loss ipo --resume

Each line of PREFS.jsonl is {"prompt", "chosen", "rejected"}: strings (the prompt tokenized as
train.finetune tokenizes a prompt, each response followed by EOS), or "prompt" a list of
messages and "chosen" / "rejected" each an assistant message, rendered with the checkpoint's
chat template. The loss (Rafailov et al. 2023; IPO: Azar et al. 2023) is TRL's DPOTrainer's for
loss_type "sigmoid" and "ipo". The reference is the base without the adapters with
--lora-rank, else --init, whose log-probabilities are computed once before the first step and
kept in OUT/reference.npz. OUT/metrics.jsonl rows: step, loss, rewards_chosen,
rewards_rejected, rewards_margin, accuracy (and eval_* of the same on --eval-data).
From Python: `from train.api import dpo` takes these flags as keyword arguments.
"""

from __future__ import annotations

import argparse
import sys

from train import api
from train.run import flags


def parser() -> argparse.ArgumentParser:
    return flags.parser("dpo", __doc__)


def main(argv=None) -> int:
    return api.main("dpo", parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
