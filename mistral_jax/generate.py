"""`python -m mistral_jax.generate CKPT PROMPT`: the command line (see mistral_jax/cli/generate.py).

The library's function is `mistral_jax.generate` (inference/generation.py); this module is only
the entry point, so that running it does not load a module the package already imported. (Do
not import it: `import mistral_jax.generate` would bind the package's `generate` to it.)
"""

import sys

from mistral_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
