"""GGUF files written here with gguf-py from tiny HF models, as llama.cpp writes them (its
tensor names, q/k rows permuted into interleaved RoPE pairs), for tests/test_gguf*.py and
test_convert_streaming.py; and their reading by transformers and by our converter."""

from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from convert.formats import gguf as gguf_format
from mistral_jax.base import trees
from mistral_jax.model import registry as models
from tests.reference import layers_renamed

IDS = np.random.default_rng(0).integers(3, 96, (2, 14))
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The state dict of an HF Llama/Mistral under llama.cpp's names and layout."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    out.update(layers_renamed(sd, c, LAYER_NAMES, "blk.{i}.{name}.weight"))
    return out


def new_writer(path: Path, c, *, arch: str = "llama", name: str = "tiny") -> gguf.GGUFWriter:
    """A writer with the hyper-parameters of the HF config `c` in llama.cpp's keys."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    return w


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(path: Path, model, qtype: Q, *, name="tiny", arch="llama", skip=(), **meta):
    """`model` as a GGUF file: 2-D tensors in `qtype`, norms in F32 (as llama.cpp keeps them);
    `meta` adds or overrides `{arch}.` keys (an int, float or str each)."""
    w = new_writer(path, model.config, arch=arch, name=name)
    for key, value in meta.items():
        add = {int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(value)]
        add(f"{arch}.{key.replace('__', '.')}", value)
    for key, value in gguf_tensors(model).items():
        if key not in skip:
            t = qtype if value.ndim == 2 else Q.F32
            w.add_tensor(key, gguf.quants.quantize(value, t), raw_dtype=t)
    finish(w)
    return path


def hf_gguf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def ours(path: Path, **options):
    p = gguf_format.conversion(path, **options)
    return trees.with_weights(models.abstract(p.config), p.weights(np.float32))
