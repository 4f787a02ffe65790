"""Chat templates: a list of {"role", "content"} messages -> prompt text -> token ids, with the
same result as transformers' `tokenizer.apply_chat_template(messages, tokenize=True)`.

The template is a Jinja string, from the checkpoint (tokenizer_config.json's `chat_template`, or
chat_template.jinja) or given by the caller, rendered the way transformers renders it (see
https://huggingface.co/docs/transformers/chat_templating): a sandboxed environment with
trim_blocks and lstrip_blocks, the loopcontrols extension, `raise_exception(message)`,
`strftime_now(format)`, a `tojson` filter that does not escape HTML, and the special tokens
(`bos_token`, ...) as strings. The text is then tokenized with special-token strings such as
"<s>" mapped to their ids and nothing added (no BOS of the tokenizer's own).

`{% generation %}...{% endgeneration %}` marks what the assistant generates, as transformers'
extension of that name does for `return_assistant_tokens_mask`; `render_spans` gives the character
spans so marked (training counts the tokens over them), `render` drops the marks.

A sentencepiece tokenizer without a template gets Mistral-7B-Instruct-v0.1's format, the
chat_template of its tokenizer_config.json on the Hugging Face Hub (early-2024 revision):
    <s>[INST] {user} [/INST]{assistant}</s>[INST] {user} [/INST]
Roles must alternate user/assistant starting with user. A leading system message is prepended to
the first user message followed by a blank line, as Mistral's later templates and mistral-common
do. For one user turn this gives exactly mistral-common's v1 token ids.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mistral_jax.text.tokenizer import Tokenizer

MISTRAL_V01_TEMPLATE = r"""
{%- set system = '' %}
{%- set loop_messages = messages %}
{%- if messages[0]['role'] == 'system' %}
  {%- set system = messages[0]['content'] + '\n\n' %}
  {%- set loop_messages = messages[1:] %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- elif message['role'] == 'user' %}
    {{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
  {%- elif message['role'] == 'assistant' %}
    {{- message['content'] + eos_token }}
  {%- else %}
    {{- raise_exception('Only user and assistant roles are supported!') }}
  {%- endif %}
{%- endfor %}
"""


# What a {% generation %} block's output is wrapped in while rendering: two Unicode noncharacters,
# which the standard sets aside for a program's internal use, so no real text holds them.
GENERATION_START, GENERATION_END = "\ufdd0", "\ufdd1"


class _Generation(jinja2.ext.Extension):
    """`{% generation %}BODY{% endgeneration %}` renders BODY between GENERATION_START and
    GENERATION_END."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

    def _wrap(self, caller) -> str:
        return GENERATION_START + caller() + GENERATION_END


class _TemplateRaised(jinja2.TemplateError):
    """`raise_exception(message)` called by a template: its message is for the user."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, str | Mapping) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', "
                             f"got {m!r:.100}")
    # transformers drops keys whose value is None before rendering
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _template(tokenizer: Tokenizer, template: str | None) -> str:
    if template is not None:
        return template
    found = tokenizer.chat_template
    if isinstance(found, list):  # several named templates: [{"name": ..., "template": ...}]
        found = {t.get("name"): t.get("template") for t in found}.get("default")
    if found:
        return found
    if tokenizer.kind == "sentencepiece":
        return MISTRAL_V01_TEMPLATE
    raise ValueError(f"{tokenizer.name}: this checkpoint has no chat template (no chat_template in "
                     "its tokenizer_config.json); pass the Jinja template string as template=...")


def render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool = True, template: str | None = None) -> str:
    """The prompt text for `messages`: `template`, else the tokenizer's chat template, else (for a
    sentencepiece tokenizer) Mistral-7B-Instruct-v0.1's format. A template's raise_exception and
    any other template error become a ValueError."""
    return render_spans(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                        template=template)[0]


def render_spans(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
                 add_generation_prompt: bool = True, template: str | None = None,
                 ) -> tuple[str, list[tuple[int, int]]]:
    """`render`'s text and the [start, end) character spans of its {% generation %} blocks
    (none when the template has no such block)."""
    plain = _check_messages(messages)
    source = _template(tokenizer, template)
    text = _render(tokenizer, plain, add_generation_prompt, source)
    if "endgeneration" not in source:
        return text, []
    if any(GENERATION_START in m["content"] or GENERATION_END in m["content"] for m in plain):
        raise ValueError("a message holds U+FDD0 or U+FDD1, the noncharacters that mark "
                         "{% generation %} blocks while rendering; remove them from the text")
    return _unmark(text)


def _unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` without the generation marks, and the spans they enclosed (nested ones merged)."""
    parts, spans, depth, start, length = [], [], 0, 0, 0
    for i, part in enumerate(re.split(f"([{GENERATION_START}{GENERATION_END}])", text)):
        if i % 2 == 0:
            parts.append(part)
            length += len(part)
        elif part == GENERATION_START:
            depth += 1
            start = length if depth == 1 else start
        elif depth:
            depth -= 1
            if depth == 0 and length > start:
                spans.append((start, length))
    return "".join(parts), spans


def _render(tokenizer: Tokenizer, plain: list[dict[str, Any]], add_generation_prompt: bool,
            source: str) -> str:
    specials = {f"{name}_token": tokenizer.id_to_piece(i) for name, i in (
        ("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("unk", tokenizer.unk_id),
        ("pad", tokenizer.pad_id)) if i is not None}
    try:
        # tools/documents: None, as transformers passes them when not given
        return _compile(source).render(
            messages=plain, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **specials)
    except _TemplateRaised as e:
        raise ValueError(e.message) from None
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {type(e).__name__}: {e}".splitlines()[0]) from None


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, template: str | None = None) -> list[int]:
    """Token ids of `render(...)`, special tokens in the text parsed, no BOS/EOS added."""
    text = render(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                  template=template)
    return tokenizer.encode_text(text, parse_special=True)
