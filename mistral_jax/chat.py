"""`python -m mistral_jax.chat CKPT`: an interactive chat in the terminal (mistral_jax/cli/chat.py).

This module is only the entry point; chat templates are mistral_jax/text/chat_template.py.
"""

import sys

from mistral_jax.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
