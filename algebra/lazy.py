"""torch and numpy, imported when a value first needs them.

Checking, planning, converting and the REPL's start do not compute tensors, and importing
torch costs seconds (numpy a quarter of one). The modules that declare tensor code
(primitives, reductions, alignment tables) therefore name these stand-ins instead of
importing the libraries at module level: `from .lazy import np, torch`. The first attribute
read (`torch.mul`, `np.zeros`) imports the real module and copies its namespace onto the
stand-in, so later reads are plain attribute look-ups. `tests/test_startup.py` checks that
`alg check` and `alg plan` of small recipes leave torch, numpy and transformers unimported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


class LazyModule:
    """A module imported on its first attribute read."""

    def __init__(self, name: str):
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str) -> Any:
        # only reached for names not yet copied: the first read, or one the module gained
        # later (a submodule imported since)
        module = importlib.import_module(self.__dict__["_lazy_name"])
        self.__dict__.update(vars(module))
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_lazy_name']!r}>"


if TYPE_CHECKING:
    import numpy as np
    import torch
else:
    torch = LazyModule("torch")
    np = LazyModule("numpy")

__all__ = ["LazyModule", "np", "torch"]
