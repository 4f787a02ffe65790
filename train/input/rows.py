"""The causal LM's rows for a run: --data (or the default run's corpus) and --eval-data read,
tokenized and packed into rows of --seq-len, with what to say about them."""

from __future__ import annotations

from train.input import data as D
from train.input import default


def packed_rows(args, tokenizer, messages: list[str]) -> tuple[D.Rows, D.Rows | None]:
    """The causal LM's data: the documents of --data (or the default run's) tokenized and
    packed into rows of --seq-len, and the same of --eval-data (None without)."""
    train_docs, eval_docs = _documents(args)
    pad = tokenizer.pad_id if tokenizer and tokenizer.pad_id is not None else \
        (tokenizer.eos_id if tokenizer else 0)
    packed = lambda docs: D.pack(D.tokenize(docs, tokenizer, loss_on=args.loss_on),
                                 args.seq_len, pad_id=pad,
                                 isolate_documents=args.isolate_documents)
    rows = packed(train_docs)
    messages += D.summary(rows, train_docs, "the training data",
                          isolate_documents=args.isolate_documents)
    if len(rows) < args.batch_size:
        messages.append("warning: " + D.describe(rows, len(train_docs), "the training data")
                        + f": fewer than one batch of {args.batch_size}, so each batch "
                        f"repeats rows; over {args.steps} step{'s' * (args.steps != 1)} each "
                        "row is seen about "
                        f"{args.steps * args.batch_size / len(rows):.0f} times")
    eval_rows = packed(eval_docs) if eval_docs else None
    if eval_rows is not None:
        messages += D.summary(eval_rows, eval_docs, "the eval data",
                              isolate_documents=args.isolate_documents)[1:]  # its warning
    return rows, eval_rows


def _documents(args) -> tuple[list[D.Document], list[D.Document]]:
    if args.data:
        train = [d for f in args.data for d in D.read_documents(f)]
    else:
        train = default.documents()[0]
    if args.eval_data:
        held_out = [d for f in args.eval_data for d in D.read_documents(f)]
    else:
        held_out = default.documents()[1] if not args.data else []
    return train, held_out
