"""The run configuration: where a run computes, in which dtype, in chunks of how many
elements.

It is decided once, from the options (`RunConfig.of`), when a run is planned, and every
plan carries it (`plan.TensorPlan.config`, beside the chunk each step streams); the
executor reads these decisions from the plan instead of deciding again. Planning needs
only names: the device is resolved (`resolve_device`, which imports torch) when
execution starts, once per evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import AlgIOError
from .options import Options, check_device

# compute dtype (Options.compute_dtype) -> its dtype code (types.DTYPES)
COMPUTE_CODES = {"float32": "F32", "float64": "F64"}


@dataclass(frozen=True)
class RunConfig:
    device: str  # as requested: cpu | cuda | cuda:N | auto (see resolve_device)
    compute_dtype: str  # float32 | float64
    chunk_elems: int  # elements per streamed chunk (a write step may round it to rows)

    @classmethod
    def of(cls, options: Options | RunConfig) -> RunConfig:
        if isinstance(options, RunConfig):
            return options
        return cls(options.device, options.compute_dtype, options.chunk_elems)

    @property
    def compute_code(self) -> str:
        """The compute dtype's code: F32 or F64."""
        return COMPUTE_CODES[self.compute_dtype]

    @property
    def compute_itemsize(self) -> int:
        """Bytes per element in the compute dtype (the planner's unit)."""
        from .types import itemsize

        return itemsize(self.compute_code)

    def torch_dtype(self) -> Any:
        from .types import torch_dtype

        return torch_dtype(self.compute_code)

    def resolve_device(self) -> Any:
        return resolve_device(self.device)


def resolve_device(name: str) -> Any:
    """The torch.device a device name runs on ("auto": cuda when there is one, else cpu);
    an AlgIOError when the machine does not have it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        check_device(name)  # not one of ours: says which are
        raise
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AlgIOError(f"--device {name}: CUDA is not available on this machine; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AlgIOError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


__all__ = ["COMPUTE_CODES", "RunConfig", "resolve_device"]
