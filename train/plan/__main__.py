"""`python -m train.plan`: see train/plan/__init__.py."""

import sys

from train.plan import main

sys.exit(main())
