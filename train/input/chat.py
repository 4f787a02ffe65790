"""Conversations -> token ids, the tokens the loss counts, and where the user turns start.

A conversation is rendered with the checkpoint's chat template (mistral_jax.text.chat_template:
a sentencepiece tokenizer without one gets Mistral's [INST] format) and tokenized whole, special
tokens parsed, as `encode_chat` does for generation. The assistant's text is found by rendering,
never by searching the text:

1. where the template has `{% generation %}` blocks, they mark it (transformers'
   `return_assistant_tokens_mask`, which TRL's assistant-only loss reads);
2. otherwise each assistant turn i is what rendering messages[:i + 1] adds to messages[:i] with
   the generation prompt. Whitespace that ends it is the template's separator before the next
   turn (ChatML's newline after <|im_end|>), not something the model writes, and is left out.

A token counts when its characters overlap the assistant's text, as transformers decides, so the
assistant's end-of-turn token (</s>, <|im_end|>) counts and the prompt tokens do not.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mistral_jax.text.chat_template import render, render_spans
from mistral_jax.text.tokenizer import Tokenizer
from train.input.packing import Tokens

ROLES = ("system", "user", "assistant", "tool")
LOSS_ON = ("assistant", "all")


def check_messages(messages: Any) -> tuple[dict[str, str], ...]:
    """`messages` as read from a data line, checked: a non-empty list of {"role", "content"}
    with a known role. The ValueError says which message and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("\"messages\" must be a non-empty list of {\"role\", \"content\"} "
                         "objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is not an object with \"role\" and \"content\"")
        for field in ("role", "content"):
            if not isinstance(m.get(field), str):
                raise ValueError(f"messages[{i}] has no string \"{field}\" (fields: "
                                 f"{sorted(m)})")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has the role {m['role']!r}; the roles are "
                             + ", ".join(ROLES))
    return tuple(messages)


def encode(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], *,
           loss_on: str = "assistant") -> Tokens:
    """The conversation's ids, the tokens counted (`loss_on` "assistant": the assistant's
    turns and their end-of-turn tokens; "all": every token) and the tokens where user turns
    after the first message start. A ValueError says what cannot be rendered or counted."""
    if tokenizer.chat_template is None and tokenizer.kind != "sentencepiece":
        raise ValueError("the checkpoint's tokenizer has no chat template to render "
                         "conversations with: add its chat_template to the checkpoint's "
                         "tokenizer_config.json (or a chat_template.jinja file)")
    roles = [m["role"] for m in messages]
    if loss_on == "assistant" and "assistant" not in roles:
        raise ValueError("the conversation has no assistant message, so --loss-on assistant "
                         "counts nothing in it: add the assistant's reply, or use --loss-on all")
    text, spans = render_spans(tokenizer, messages, add_generation_prompt=False)
    ids, offsets = tokenizer.encode_offsets(text, parse_special=True)
    starts = np.asarray([a for a, _ in offsets], np.int64).reshape(-1)
    ends = np.asarray([b for _, b in offsets], np.int64).reshape(-1)
    if loss_on == "all":
        counted = np.ones(len(ids), bool)
    else:
        if not spans:
            spans = _assistant_spans(tokenizer, messages, text)
        counted = np.zeros(len(ids), bool)
        for a, b in spans:
            counted |= (starts < b) & (ends > a)
        if not counted.any():
            raise ValueError("the chat template's {% generation %} blocks mark none of the "
                             "assistant's text, so --loss-on assistant counts nothing")
    turns, token_starts = [], starts.tolist()
    for i in range(1, len(messages)):
        if roles[i] == "user":
            head = _render_or_none(tokenizer, messages[:i], False)
            if head is not None and text.startswith(head):
                turns.append(bisect.bisect_left(token_starts, len(head)))
    return Tokens(np.asarray(ids, np.int32), counted, tuple(t for t in turns if 0 < t < len(ids)))


def _assistant_spans(tokenizer: Tokenizer, messages, text: str) -> list[tuple[int, int]]:
    """[start, end) of each assistant turn in `text`, by rendering the prefixes."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render_or_none(tokenizer, messages[:i], True) if i else ""
        through = _render_or_none(tokenizer, messages[:i + 1], False)
        if before is None or through is None or not (
                through.startswith(before) and text.startswith(through)):
            raise ValueError(f"the chat template does not render messages[:{i + 1}] as the "
                             "start of the whole conversation, so rendering cannot tell the "
                             f"assistant's text (messages[{i}]) apart; put {{% generation %}}"
                             "...{% endgeneration %} around it in the template, or use "
                             "--loss-on all")
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return spans


def _render_or_none(tokenizer: Tokenizer, messages, add_generation_prompt: bool) -> str | None:
    """The template's text for a prefix of the conversation; None where it refuses one (some
    templates want the conversation to end with a user turn)."""
    try:
        return render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except ValueError:
        return None
