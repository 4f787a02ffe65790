"""GGUF files (llama.cpp's format, `llama` / `mistral` architecture) -> our weights.

Read with the `gguf` package (llama.cpp's gguf-py, an optional extra): the metadata gives the
config and the tokenizer; tensors are memory-mapped and dequantized one at a time. What llama.cpp's
`convert_hf_to_gguf.py` does to a Llama, and what is undone here:

- Names: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
  ffn_up, ffn_down}`, `output_norm`, `output` (absent when the head is tied to the embedding).
- Shapes: GGUF lists dims fastest first (ggml's `ne`); read back in C order a Linear weight is
  [out, in], as in torch, so HF's key map applies unchanged.
- RoPE: q/k rows are permuted from HF's rotate-halves layout to interleaved pairs; permuted back.
- Tokenizer: rebuilt from `tokenizer.ggml.*` in convert/read/gguf_tokenizer.py.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from convert.formats.hf import mistral_keymap
from convert.mapping.conversion import Conversion
from convert.mapping.keymaps import KeyMap, keymap_target, renamed
from convert.mapping.layouts import rope_halves
from convert.read import pages
from convert.read.errors import ConversionError, listed
from convert.read.gguf_tokenizer import read_tokenizer
from convert.read.sources import TensorSource
from mistral_jax.arch.configs import ConfigError, MistralConfig
from mistral_jax.quant import int8 as quant

ARCHITECTURES = ("llama", "mistral")
Q8_0_BLOCK = 32  # a Q8_0 block: a float16 scale and 32 int8 values along a row
# Tensor types dequantized here (by gguf-py); IQ*, TQ* and the rest are refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")
# GGUF tensor name -> the HF Llama name whose layout it shares (after the q/k un-permutation).
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConversionError("reading GGUF files needs the gguf package: "
                              "pip install 'mistral_jax[gguf]'") from None
    return gguf


DESCRIPTION = "a GGUF file (llama or mistral architecture)"


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF" or path.suffix == ".gguf"


def add_arguments(parser) -> None:
    parser.add_argument("--sliding-window", type=int, default=None, metavar="N",
                        help="GGUF: attend over the last N tokens only (GGUF files of Mistral-7B "
                             "do not record its 4096-token window; llama.cpp attends over all)")


class GGUFSource(TensorSource):
    """The tensors of one GGUF file, memory-mapped; `get` dequantizes one tensor to float32."""

    def __init__(self, path: Path, reader):
        super().__init__({t.name: path for t in reader.tensors})
        self.path, self.reader = path, reader
        self.tensors = {t.name: t for t in reader.tensors}

    def get(self, key: str) -> np.ndarray:
        t = self.tensors[key]
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml's ne, fastest first -> C order
        try:
            w = np.asarray(_gguf().quants.dequantize(t.data, t.tensor_type), np.float32)
        except (ValueError, NotImplementedError) as e:
            raise ConversionError(f"{self.path}: tensor {key} ({t.tensor_type.name}, shape "
                                  f"{shape}) cannot be dequantized: {e}") from None
        if np.may_share_memory(w, t.data):  # F32 comes back as a view of the memory map: copy it
            w = w.copy()
        return w.reshape(shape)

    def int8_block_size(self, key: str) -> int | None:
        return Q8_0_BLOCK if self.tensors[key].tensor_type.name == "Q8_0" else None

    def int8_blocks(self, key: str):
        t = self.tensors[key]
        if self.int8_block_size(key) is None:
            return None
        shape = tuple(int(n) for n in reversed(t.shape))
        blocks = np.asarray(t.data).reshape(-1, 2 + Q8_0_BLOCK)  # float16 scale, 32 int8
        scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        values = blocks[:, 2:].copy().view(np.int8).reshape(shape)
        return values, np.repeat(scale, Q8_0_BLOCK, axis=1).reshape(shape), Q8_0_BLOCK

    def release(self, key: str) -> None:
        """Hand the pages of `key`'s bytes back to the kernel (read again if touched)."""
        t = self.tensors[key]
        pages.release(t.data.ctypes.data, int(t.n_bytes))  # t.data: a view of the file's map


def _reader_class():
    gguf = _gguf()

    class Reader(gguf.GGUFReader):
        """gguf-py's reader, which first checks that every tensor lies inside the file, so that
        a truncated file is reported by the first tensor it cuts."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            for field in fields:
                _, name, _, dims, ggml_type, offset = field.parts
                name = bytes(name).decode("utf-8", "replace")
                try:
                    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type[0])]
                except (ValueError, KeyError):
                    raise ValueError(f"tensor {name} has unknown ggml type "
                                     f"{ggml_type[0]}") from None
                end = start_offs + int(offset[0]) + int(np.prod(dims)) * size // block
                if end > len(self.data):
                    raise ValueError(f"tensor {name} ends at byte {end}, past the end of the file "
                                     f"({len(self.data)} bytes): the file is truncated")
            super()._build_tensors(start_offs, fields)

    return Reader


def read(path: Path):
    """gguf-py's reader over `path` (memory-mapped) and its metadata as plain Python values."""
    try:
        reader = _reader_class()(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
        reader.fields.clear()  # a numpy view per token and merge: let them go
    except ConversionError:
        raise
    except Exception as e:  # gguf-py raises ValueError, IndexError, numpy errors alike
        raise ConversionError(f"{path}: cannot read it as GGUF ({path.stat().st_size} bytes; "
                              f"truncated or corrupt?): {e}") from None
    return reader, meta


def read_config(path: Path, meta: dict, tensors: dict, *,
                sliding_window: int | None = None) -> MistralConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{path}: general.architecture is {arch!r}; only "
                              f"{' and '.join(map(repr, ARCHITECTURES))} convert to mistral_jax")

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # some files give per-layer values; we need them all equal
            if len(set(value)) != 1:
                raise ConversionError(f"{path}: {arch}.{key} differs between layers ({value}); "
                                      "mistral_jax needs one value for every layer")
            value = value[0]
        return value

    def need(key: str):
        if get(key) is None:
            raise ConversionError(f"{path}: metadata key {arch}.{key} is missing")
        return get(key)

    def refuse(key: str, what: str):
        raise ConversionError(f"{path}: {arch}.{key} = {get(key)!r}: {what}, which mistral_jax "
                              "does not implement")

    if get("expert_count", 0):
        refuse("expert_count", "a mixture of experts")
    if get("rope.scaling.type", "none") not in ("none", "linear"):  # linear by 1.0 is none
        refuse("rope.scaling.type", "RoPE scaling")
    if get("rope.scaling.factor", 1.0) != 1.0:
        refuse("rope.scaling.factor", f"RoPE scaling ({get('rope.scaling.type')})")
    if "rope_freqs.weight" in tensors:
        raise ConversionError(f"{path}: tensor rope_freqs.weight scales RoPE frequencies "
                              "(Llama 3.1 style), which mistral_jax does not implement")
    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
        refuse("attention.value_length", f"values of another size than keys ({head_dim})")
    if get("rope.dimension_count", head_dim) != head_dim:
        refuse("rope.dimension_count", f"RoPE on part of each head (of {head_dim})")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else get("vocab_size")
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])  # ne = [hidden, vocab]
    if vocab is None:
        raise ConversionError(f"{path}: no tokenizer.ggml.tokens, {arch}.vocab_size nor "
                              "token_embd.weight to give the vocabulary size")
    if sliding_window is None and arch == "mistral":  # llama.cpp's llama attends over all
        sliding_window = get("attention.sliding_window")
    special = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    try:
        return MistralConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=need("feed_forward_length"),
            num_hidden_layers=need("block_count"), num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
            max_position_embeddings=need("context_length"),
            rms_norm_eps=need("attention.layer_norm_rms_epsilon"),
            rope_theta=get("rope.freq_base", 10000.0),  # llama.cpp's default when absent
            sliding_window=sliding_window, tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=special["bos"], eos_token_id=special["eos"],
            pad_token_id=special["padding"])
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None


def keymap(c: MistralConfig) -> KeyMap:
    """HF's table under GGUF's names, q/k rows first taken back from RoPE's interleaved pairs."""
    return renamed(mistral_keymap(c), HF_NAMES, first={
        "blk.{i}.attn_q.weight": rope_halves(c.num_attention_heads),
        "blk.{i}.attn_k.weight": rope_halves(c.num_key_value_heads)})


def conversion(path: Path, *, sliding_window: int | None = None) -> Conversion:
    reader, meta = read(path)
    tensors = {t.name: t for t in reader.tensors}
    config = read_config(path, meta, tensors, sliding_window=sliding_window)
    unsupported = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
                   if t.tensor_type.name not in SUPPORTED_TYPES]
    if unsupported:
        raise listed(f"{path}: {len(unsupported)} tensor(s) in a type this converter does not "
                     "dequantize; convert the file again to a supported type",
                     [*unsupported[:8], *["..."] * (len(unsupported) > 8),
                      f"supported: {', '.join(SUPPORTED_TYPES)}"])
    notes = []  # what becomes of the quantized tensors depends on the flags: `storage_notes`
    name = str(meta.get("general.name", ""))
    if config.sliding_window is None and "mistral" in name.lower():
        notes.append(f"{path.name} ({name}) records no sliding window: converted with full "
                     "attention, as llama.cpp runs it (--sliding-window 4096 for Mistral-7B's)")
    return Conversion(config, GGUFSource(path, reader), keymap(config), (),
                      read_tokenizer(path, meta), notes, origin=str(path))


def storage_notes(conversion: Conversion, *, dtype: str | None, quantize: str | None,
                  kept: Collection[str]) -> list[str]:
    """What is done with the file's tensors in types other than F32 under the flags given:
    dequantized and stored in --dtype (float32 without it); with --quantize, the matmul weights
    requantized, except those `kept` as the file's own int8 blocks (Q8_0)."""
    matmuls = quant.table(conversion.config) if quantize else {}
    fates: dict[str, list[str]] = {}  # what is done -> the tensor types it is done to
    for key, tensor in conversion.source.tensors.items():
        kind = tensor.tensor_type.name
        if kind == "F32":
            continue
        target = keymap_target(conversion.keymap, key)
        if target in kept:
            fate = "kept as they are, int8 with their own block scales"
        elif target in matmuls:
            fate = f"dequantized and requantized to {quantize} with a scale per output channel"
        else:
            fate = f"dequantized and stored as {dtype or 'float32'}"
        if kind not in fates.setdefault(fate, []):
            fates[fate].append(kind)
    if not fates:
        return []
    done = "; ".join(f"{'/'.join(sorted(kinds))} tensors {fate}" for fate, kinds in fates.items())
    hint = " (--dtype bfloat16 or --quantize int8 store fewer bytes; --quantize int8 keeps " \
        "Q8_0 tensors as they are)" if dtype is None and quantize is None else ""
    return [f"{conversion.source.path.name}: {done}{hint}"]
