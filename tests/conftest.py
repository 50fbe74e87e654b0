"""Shared fixtures: tiny checkpoints of real architectures, built once per session.

Nothing is downloaded: `algebra.tiny` builds a Llama causal LM family, a Llama
sequence-classification reward model on the same base and a BPE tokenizer locally.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# One intra-op thread, here and in the `python -m algebra` subprocesses tests start (an
# OMP_NUM_THREADS of the caller's wins): the tests' tensors are tiny, so a second thread
# only adds synchronisation, and on a busy machine every parallel region waits for it to be
# scheduled (a forward pass of the tiny reward model: 12 ms on one thread, 0.2-0.6 s on two
# at a load of 10). The real-model tier keeps torch's own choice, TORCH_THREADS
# (tests/real/conftest.py).
TORCH_THREADS = torch.get_num_threads()
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# In-process tests exercise chunk boundaries on tiny models with chunks far below the floor
# users get (algebra.options.MIN_CHUNK_ELEMS); tests/test_trust.py checks that floor.
from algebra.options import Options  # noqa: E402

Options.min_chunk = 1


@pytest.fixture(scope="session", autouse=True)
def _alg_cache(tmp_path_factory):
    # keep the content-hash cache out of the user's home
    os.environ["ALG_CACHE"] = str(tmp_path_factory.mktemp("alg-cache"))


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """float32 family: base, math, rm (seq-cls), rl1, rl2."""
    from algebra.tiny import build_family

    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory) -> dict[str, Path]:
    from algebra.tiny import build_family

    return build_family(tmp_path_factory.mktemp("family_bf16"), dtype=torch.bfloat16, layers=3)


@pytest.fixture(scope="session")
def family_vocab(tmp_path_factory) -> dict[str, Path]:
    """The reward model has 8 more vocabulary rows than the causal LMs."""
    from algebra.tiny import build_family

    return build_family(tmp_path_factory.mktemp("family_vocab"), extra_rm_vocab=8, names=("base", "math", "rm"))


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the safetensors library."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(Path(folder) / "*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.fixture
def read():
    return read_folder


@pytest.fixture(scope="session")
def rms(tmp_path_factory) -> dict[str, Path]:
    """Two tiny reward models (rm-helpful, rm-harmless), a policy and an lm on one base."""
    from algebra.tiny import build_reward_models

    return build_reward_models(tmp_path_factory.mktemp("rms"))


@pytest.fixture
def ws(tmp_path, rms) -> Path:
    """A folder with models/ (links to `rms`) and data/ (a copy of examples/data)."""
    import shutil

    (tmp_path / "models").mkdir()
    for name, path in rms.items():
        (tmp_path / "models" / name).symlink_to(path)
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "data", tmp_path / "data")
    return tmp_path


def quiet_interpreter(base: Path, **kw):
    """An Interpreter on the CPU whose print output is dropped and whose warnings are
    collected in `.warnings` (diagnostics) for tests to inspect."""
    from algebra import Interpreter, Options

    warnings: list = []
    interp = Interpreter(options=Options(device="cpu", warn=warnings.append, out=lambda s: None, **kw),
                         base_dir=base)
    interp.warnings = warnings  # type: ignore[attr-defined]
    return interp


def alg_main(*args: str, cwd: Path):
    """`alg ARGS` run in this process: `algebra.cli.main` in `cwd`, with stdout and stderr
    of its own and argparse's SystemExit (usage errors, --help) taken as the exit status.
    Returns a `subprocess.CompletedProcess`, as `subprocess.run([... "-m", "algebra", ...])`
    would. It saves each test the seconds of a `python -m algebra` start-up; a test whose
    point is the process boundary (signals, the real entry point's exit status) runs a
    subprocess instead, and each command keeps at least one such test."""
    import contextlib
    import io
    import subprocess

    from algebra.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=err)
    return subprocess.CompletedProcess(["alg", *args], code, out.getvalue(), err.getvalue())
