"""DogeRM on the real-model tier: find (or build) SmolLM2-135M-Instruct's fixtures with
tests/real/build.py, then run sweep.alg on them with `alg run --set`.

    python examples/papers/dogerm/run.py [--step 0.1] [--data pairs.jsonl] [--out DIR]

Extra arguments after `--` go to `alg run` unchanged.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def fixtures() -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests" / "real"))
    import build  # tests/real/build.py: the real tier's fixtures, built once and cached

    return build.ensure()


def _rel(p: Path) -> Path:
    """p relative to this folder (the recipe's, where alg resolves it) when inside it, so
    the outputs name the data as `pairs.jsonl`, not by this machine's absolute path."""
    p = p.resolve()
    return p.relative_to(HERE) if p.is_relative_to(HERE) else p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", default="0.5", help="lam step (lam = 0, step, ..., 1)")
    ap.add_argument("--data", default=str(HERE / "pairs.jsonl"))
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for sweep.json and sweep.png")
    ap.add_argument("--verb", default="run", choices=("run", "check"))
    ap.add_argument("rest", nargs="*", help="after --: more options for alg")
    a = ap.parse_args(argv)
    f = fixtures()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "algebra", a.verb, str(HERE / "sweep.alg"),
           "--set", f"rm_dir={f['rm']}", "--set", f"ft_dir={f['ft1']}",
           "--set", f"data={_rel(Path(a.data))}", "--set", f"step={a.step}",
           "--set", f"out={_rel(out / 'sweep.json')}", "--set", f"plot={_rel(out / 'sweep.png')}", *a.rest]
    t = time.perf_counter()
    rc = subprocess.call(cmd, cwd=HERE)  # alg from the environment (PYTHONPATH or installed)
    if rc == 0 and a.verb == "run":
        import build

        build.redact(out, HERE)  # sweep.json names the models and data without this machine's paths
    print(f"alg {a.verb}: exit {rc}, {time.perf_counter() - t:.1f}s wall", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
