"""alg: a declarative model-algebra language for merging checkpoints.

    from algebra import Interpreter
    Interpreter(device="cpu").eval('save(merge(load("rm"), load("lm"), 0.3), "out")')

Every pipeline stage is also callable on its own: see `algebra.api`.
"""

__version__ = "0.1.0"

from .errors import AlgError  # noqa: E402
from .interpreter import Interpreter, Result  # noqa: E402
from .options import Options  # noqa: E402

__all__ = ["AlgError", "Interpreter", "Options", "Result", "__version__"]
