"""What a source-format module hands `convert.from_torch`: a `Conversion`, the whole of one
checkpoint's way onto our weights (config, tensors, key map, tokenizer), before any tensor is
read.

Each format module (hf, mistral_original, gguf, megatron) builds one with `conversion(path,
**options)`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from convert.mapping.keymaps import KeyMap, Sink, convert_tensors, keymap_target
from convert.read.sources import TensorSource
from mistral_jax.arch.configs import Config
from mistral_jax.base import trees
from mistral_jax.model import registry as models
from mistral_jax.quant import int8 as quant
from mistral_jax.text.tokenizer import Tokenizer


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

    def convert(self, *, dtype=None, sink: Sink | None = None, progress: bool = False,
                quantized: Collection[str] = ()):
        """`convert_tensors` on this conversion; the weights named in `quantized` reach the
        sink as their source's int8 blocks (a `quant.QWeight`), see `quantized_groups`."""
        return convert_tensors(self.source, self.keymap, self.config, ignore=self.ignore,
                               dtype=dtype, sink=sink, progress=progress, origin=self.origin,
                               quantized=quantized)

    def quantized_groups(self) -> dict[str, int]:
        """{our weight: scale groups G} for each matmul weight whose every source tensor is
        int8 blocks (GGUF's Q8_0) of one size along its input: those are kept as they are."""
        kinds = quant.table(self.config)
        found: dict[str, set] = {}
        for key in self.source.keys():
            name = keymap_target(self.keymap, key)
            if name in kinds:
                found.setdefault(name, set()).add(self.source.int8_block_size(key))
        shapes = trees.flatten(trees.weights(models.abstract(self.config)))
        groups = {}
        for name, sizes in found.items():
            layout, n_in = kinds[name]
            k = quant.input_size(shapes[name].shape, quant.lead(name), n_in, layout)
            if len(sizes) == 1 and None not in sizes and k % next(iter(sizes)) == 0:
                groups[name] = k // next(iter(sizes))
        return groups
