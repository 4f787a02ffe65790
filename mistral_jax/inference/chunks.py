"""The lengths prompts are cut and padded to, shared by `generation` and the serving engine:
few distinct lengths, so each compiles a few times, not once per prompt.

A prompt (or a prefill chunk) is padded to a length bucket, a power of two from MIN_BUCKET; a
long prompt is prefilled in chunks of at most MAX_CHUNK tokens, and with a sliding window in
chunks that divide it, so a chunk aligned to its size never wraps around the rolling buffer
and no T x T score matrix is built.
"""

from __future__ import annotations

import math

MAX_CHUNK = 512  # prefill chunk for models without a window; longer prompts use several chunks
MIN_BUCKET = 16  # the shortest padded prompt (or prefill chunk): few lengths, few compilations


def bucket(length: int) -> int:
    """The padded length of `length` tokens: a power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())


def window_chunk(config, chunk: int) -> int:
    """The largest chunk up to `chunk` that divides the sliding window (if any), so that chunks
    aligned to it never wrap around the rolling buffer."""
    window = config.sliding_window
    if window is not None:
        chunk = min(chunk, window)
        while window % chunk:
            chunk -= 1
    return chunk


def prefill_chunks(config, prompt_len: int) -> tuple[int, int]:
    """(padded prompt length, prefill chunk): the chunk divides the padded length and the window,
    so no chunk wraps around the rolling buffer."""
    padded = bucket(prompt_len)
    chunk = window_chunk(config, min(padded, MAX_CHUNK))
    return math.ceil(padded / chunk) * chunk, chunk

