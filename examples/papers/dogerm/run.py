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
        plot_margins(out / "sweep.json", out / "margin.png")
    print(f"alg {a.verb}: exit {rc}, {time.perf_counter() - t:.1f}s wall", file=sys.stderr)
    return rc


def plot_margins(sweep: Path, path: Path) -> None:
    """Accuracy and mean chosen-minus-rejected margin against lam, overall and per subset
    (alg's sweep.png draws the accuracy; the margin shows a change too small to flip a pair)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = json.loads(sweep.read_text())["results"]
    xs = [p["x"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in zip(axes, ("accuracy", "margin"), ("accuracy", "mean margin (chosen - rejected)"),
                              strict=True):
        ax.plot(xs, [p[key] for p in points], "o-", lw=2, label="all")
        for name in points[0]["subsets"]:
            ax.plot(xs, [p["subsets"][name][key] for p in points], ".-", label=name)
        ax.set_xlabel("lam")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle("DogeRM: reward(merge(rm, ft1, lam)) on SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
