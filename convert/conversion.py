"""What a source-format module hands `convert.from_torch`: a `Conversion`, the whole of one
checkpoint's way onto our weights (config, tensors, key map, tokenizer), before any tensor is
read.

Each format module (hf, mistral_original, gguf, megatron) builds one with `conversion(path,
**options)`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from convert.keymaps import KeyMap, Sink, convert_tensors
from convert.sources import TensorSource
from mistral_jax.configs import Config
from mistral_jax.tokenizer import Tokenizer


@dataclass
class Conversion:
    """The model's config, where its tensors are, how they map onto our weights, and the
    tokenizer (None when the source has none)."""

    config: Config
    source: TensorSource
    keymap: KeyMap
    ignore: Collection[str] = ()
    tokenizer: Tokenizer | None = None
    notes: list[str] = field(default_factory=list)  # told to the user (defaults taken, etc.)
    origin: str = ""  # where the config came from (a file), named in errors

    def weights(self, dtype=None) -> dict:
        """Every weight in memory as a nested dict of numpy arrays (tests, small models)."""
        return self.convert(dtype=dtype)

    def convert(self, *, dtype=None, sink: Sink | None = None, progress: bool = False):
        """`convert_tensors` on this conversion."""
        return convert_tensors(self.source, self.keymap, self.config, ignore=self.ignore,
                               dtype=dtype, sink=sink, progress=progress, origin=self.origin)
