"""The embedded default run (no --init, no --data): a small Mistral trained from scratch on
Ambrose Bierce's *The Devil's Dictionary* (public domain, shipped in train/corpus), with a
byte-level BPE tokenizer trained on the same text at start-up (about a second).

The model: 4 layers, hidden 256, 8 query heads of 32, 2 kv heads, SwiGLU 768, vocab 4096,
no window: 5.1M parameters, small enough to train visibly in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import re
from pathlib import Path

from mistral_jax.arch.configs import MistralConfig
from mistral_jax.text.tokenizer import Tokenizer
from train.input.data import Document

CORPUS = Path(__file__).parents[1] / "corpus" / "devils_dictionary.txt"
VOCAB = 4096
# A 4-layer Mistral of 5.1M parameters (Llama-style: no window), grouped-query attention.
CONFIG = MistralConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=32, sliding_window=None, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2)
EVAL_EVERY_NTH = 20  # every 20th dictionary entry is held out for evaluation
# Flags the default run uses unless given (chosen to finish in a few minutes on 2 cores).
FLAGS = dict(steps=120, batch_size=8, seq_len=256, lr=3e-3, warmup=12, eval_every=40,
             save_every=40)

ENTRY = re.compile(r"^[A-Z][A-Z0-9' .-]*, ", re.MULTILINE)  # "ABASEMENT, n.  A decent..."


def entries(text: str) -> list[str]:
    """The preface and each dictionary entry, as separate documents."""
    starts = [0] + [m.start() for m in ENTRY.finditer(text)] + [len(text)]
    return [text[a:b].strip() for a, b in zip(starts, starts[1:], strict=False)
            if text[a:b].strip()]


def documents() -> tuple[list[Document], list[Document]]:
    """(training documents, held-out documents)."""
    docs = [Document(e) for e in entries(CORPUS.read_text(encoding="utf-8"))]
    held_out = [d for i, d in enumerate(docs) if i % EVAL_EVERY_NTH == EVAL_EVERY_NTH - 1]
    train = [d for i, d in enumerate(docs) if i % EVAL_EVERY_NTH != EVAL_EVERY_NTH - 1]
    return train, held_out


def tokenizer() -> Tokenizer:
    """A byte-level BPE (GPT-2's scheme) of VOCAB pieces trained on the corpus; <s> is BOS,
    </s> EOS. Training is deterministic, so a resumed run rebuilds the same tokenizer."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(entries(CORPUS.read_text(encoding="utf-8")), trainer=trainer)
    return Tokenizer(bpe.to_str().encode("utf-8"), "hf", "default-bpe")
