"""The training CLI's own error, in a module of its own (no JAX import): `python -m
train.finetune` runs finetune.py as `__main__`, so a class defined there would be a different
class from the one `train.run.loop` imports, and its errors would escape as tracebacks. And
`errors()`, every error the training command lines (train.finetune, train.dpo, train.plan)
report in one line."""


class UsageError(ValueError):
    """A flag combination that cannot work; one line, exit code 2."""


def errors() -> tuple:
    """The exceptions a command line reports in one line (exit code 2)."""
    from mistral_jax.arch.configs import ConfigError
    from mistral_jax.io.checkpoint import CheckpointError
    from mistral_jax.io.lora import LoraError
    from mistral_jax.parallel.sharding import ShardingError
    from train.input.data import DataError

    return (UsageError, DataError, CheckpointError, ConfigError, ShardingError, LoraError,
            FileNotFoundError)
