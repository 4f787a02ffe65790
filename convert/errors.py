"""The one error every converter raises for input it cannot convert.

It lives alone so that the lowest layers (reading pickles, safetensors, GGUF metadata) can raise
it without importing what sits above them.
"""


class ConversionError(ValueError):
    """Source weights that do not fit the target model; the message lists every problem."""
