"""`python -m algebra` is the `alg` command."""

import sys

from .cli import main

sys.exit(main())
