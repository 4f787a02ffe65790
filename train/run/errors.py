"""The training CLI's own error, in a module of its own (no JAX import): `python -m
train.finetune` runs finetune.py as `__main__`, so a class defined there would be a different
class from the one `train.run.loop` imports, and its errors would escape as tracebacks."""


class UsageError(ValueError):
    """A flag combination that cannot work; one line, exit code 2."""
