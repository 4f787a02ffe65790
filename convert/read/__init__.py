"""Reading the torch side's files, the lowest layer of `convert/`: tensors one at a time
(safetensors, torch pickles without running them, GGUF), Megatron's shard files, a GGUF file's
tokenizer, handing mapped pages back; and `ConversionError`, which every layer raises.
"""
