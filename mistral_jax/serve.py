"""`python -m mistral_jax.serve CKPT`: the HTTP server's command line (mistral_jax/cli/serve.py;
the app is mistral_jax/serving/). This module is only the entry point."""

import sys

from mistral_jax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
