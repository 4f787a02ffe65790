"""Each torch-side format, above `convert.mapping`: its detection, config, key map and tokenizer
(hf, mistral_original, gguf, megatron), and PEFT adapter folders (peft).
"""
