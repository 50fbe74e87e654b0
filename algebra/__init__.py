"""alg: a declarative model-algebra language for merging checkpoints.

    from algebra import Interpreter
    Interpreter(device="cpu").eval('save(merge(load("rm"), load("lm"), 0.3), "out")')

Every pipeline stage is also callable on its own: see `algebra.api`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["AlgError", "Interpreter", "Options", "Result", "__version__"]

if TYPE_CHECKING:
    from .errors import AlgError
    from .interpreter import Interpreter, Result
    from .options import Options


def __getattr__(name: str) -> Any:
    # imported on first use, so `alg --help` and usage errors do not pay for torch
    if name == "AlgError":
        from .errors import AlgError

        return AlgError
    if name in ("Interpreter", "Result"):
        from . import interpreter

        return getattr(interpreter, name)
    if name == "Options":
        from .options import Options

        return Options
    raise AttributeError(f"module 'algebra' has no attribute {name!r}")
