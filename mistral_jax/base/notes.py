"""What the library tells its user on the way: one line each on stderr, `note: ...` for what it
chose on their behalf (a mesh, a device count), `warning: ...` for what may not be what they
meant. Both go through the `mistral_jax` logger, so `logging.getLogger("mistral_jax")
.setLevel(logging.ERROR)` silences them."""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("mistral_jax")


class _Stderr(logging.Handler):
    """Writes to the `sys.stderr` of the moment (a handler made at import would keep the
    stream pytest or a caller later replaces)."""

    def emit(self, record: logging.LogRecord) -> None:
        kind = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        print(f"{kind}: {record.getMessage()}", file=sys.stderr, flush=True)


if not LOGGER.handlers:
    LOGGER.addHandler(_Stderr())
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False

_said: set[str] = set()


def note(message: str) -> None:
    LOGGER.info(message)


def warn(message: str) -> None:
    LOGGER.warning(message)


def warn_once(key: str, message: str) -> None:
    """`warn`, the first time `key` is seen in this process."""
    if key not in _said:
        _said.add(key)
        warn(message)
