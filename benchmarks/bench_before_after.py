"""Two source trees of alg side by side, in one sitting: lerp and TIES wall and CPU time.

    python benchmarks/bench_before_after.py --before /path/to/old/tree [--after .] [--layers 2] [--repeat 3]

A refactor must not slow the engine down. This runs `python -m algebra run` of the same
lerp and TIES recipes with each tree on PYTHONPATH, alternating which tree goes first in
each round, on bench_lerp.py's synthetic TinyLlama-shaped base and bench_ties.py's two
fine-tunes (built once under --dir, at --layers layers). It reports, per tree and recipe,
the median wall time and the median CPU time (user + system of the child, which a
loaded machine inflates less than wall time), and checks that both trees write
bit-identical outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ties as bt  # noqa: E402  (the synthetic inputs)

RECIPES = {
    "lerp": 'save(lerp(load("a"), load("ties-ft1"), 0.3), "out-{tag}-lerp", overwrite=true)\n',
    "ties": 'save(ties(load("a"), [load("ties-ft1"), load("ties-ft2")], 0.5, 0.5), "out-{tag}-ties", overwrite=true)\n',
}


def run(tree: Path, work: Path, recipe: str, tag: str) -> tuple[float, float]:
    path = work / f"bench-{tag}.alg"
    path.write_text(recipe.format(tag=tag))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "algebra", "run", str(path), "--quiet"], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/alg-bench"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    bt.ensure_finetunes(a.dir, a.layers)
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(a.repeat):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in RECIPES:
            for tag in order:
                times.setdefault((tag, name), []).append(run(trees[tag], a.dir, RECIPES[name], tag))
    print(f"{a.layers} layers, {a.repeat} rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"{'recipe':6} {'tree':7} {'wall (median)':>14} {'CPU (median)':>13}")
    for name in RECIPES:
        for tag in trees:
            w = statistics.median(t[0] for t in times[(tag, name)])
            c = statistics.median(t[1] for t in times[(tag, name)])
            print(f"{name:6} {tag:7} {w:13.2f}s {c:12.2f}s")
        same = digest(a.dir / f"out-before-{name}") == digest(a.dir / f"out-after-{name}")
        print(f"{name:6} outputs bit-identical: {same}")


if __name__ == "__main__":
    main()
