"""The one error every converter raises for input it cannot convert, and the shape of its message.

It lives in the lowest layer, beside the readers of pickles, safetensors and GGUF metadata that
raise it first, so that every layer of `convert/` can raise it without importing upwards.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConversionError(ValueError):
    """Source weights that do not fit the target model; the message lists every problem."""


def listed(summary: str, items: Iterable[str]) -> ConversionError:
    """An error whose first line is `summary` (the file, what is wrong, what to do) and whose
    items follow, one an indented line, as `mistral_jax.io.checkpoint`'s load errors read."""
    return ConversionError("\n".join([summary, *(f"  {item}" for item in items)]))
