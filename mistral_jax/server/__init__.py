"""The OpenAI-compatible HTTP server over the continuous-batching engine: `python -m
mistral_jax.serve` (mistral_jax/cli/serve.py). Needs the `[serve]` extra (FastAPI, uvicorn);
the library itself never imports this package."""
