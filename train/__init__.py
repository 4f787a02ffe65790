"""Fine-tuning, in folders that are layers, lowest first; each imports only its own folder and
the ones below it, and mistral_jax (tests/test_layout.py):

    input/     documents, packed rows and batches (data); the embedded default run (default)
    compute/   the jitted train and eval steps (step); their model FLOPs (flops)
    run/       the loop, its checkpoints, metrics and loss.png, usage errors
    finetune, eval, merge_lora   the `python -m train.*` entry points, at the top
"""
