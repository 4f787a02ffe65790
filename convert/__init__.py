"""Torch-side formats <-> our checkpoints, in folders that are layers, lowest first; each imports
only its own folder and the ones below it (tests/test_convert_layout.py):

    read/      files: safetensors, torch pickles, GGUF, Megatron shards; ConversionError
    mapping/   key maps, tensor layouts, a source's whole conversion
    formats/   hf, mistral_original, gguf, megatron, peft
    from_torch, to_torch, parity, cli   the `python -m convert.*` entry points, at the top
"""
