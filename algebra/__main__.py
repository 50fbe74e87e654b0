"""`python -m algebra` is the `alg` command."""

import sys

from .cli import entry

sys.exit(entry())
