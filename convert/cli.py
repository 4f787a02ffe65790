"""What the converters' command lines share: run the conversion, report one line, exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def report(write: Callable[[], Path]) -> int:
    """`wrote PATH` and 0, or `error: ...` on stderr and 1 (the converters raise ValueError for
    bad input and OSError for files they cannot read or write)."""
    try:
        path = write()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
