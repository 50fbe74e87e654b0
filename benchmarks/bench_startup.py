"""Start-up benchmark: how long `alg check` and `alg plan` of small recipes take as whole
processes, and which heavy libraries they import.

    python benchmarks/bench_startup.py            # from the repository root

What it measures. In a work directory (`--dir`, default /tmp/alg-bench-startup) it writes
two tiny Llama-shaped checkpoints `a` and `b` (a config.json and a model.safetensors whose
header it writes byte by byte: no torch, numpy or safetensors involved) and three recipes:

  small.alg   plain values only: x = 1 + 2; print(x)
  lerp.alg    a = load("a"); b = load("b"); save(lerp(a, b, 0.3), "out")
  merge.alg   ties, slerp and DogeRM's merge of a and b, saved (reductions included)

Then it runs `python -m algebra check small.alg`, `check lerp.alg` and `plan merge.alg`,
each `--repeat` times (default 5) after one untimed warm-up run (which fills Python's
bytecode cache and alg's parser cache, as any second start on a user's machine finds
them), and prints for each the median wall time from process start to exit and the
median CPU time (user + system, the child's rusage; on a busy machine wall time includes
waiting for a core, CPU time does not). Each child runs with bytecode caching on
(PYTHONDONTWRITEBYTECODE removed from its environment) and `ALG_CACHE` in the work dir.

Finally it runs each command once more in one process (`algebra.cli.main`) and prints
which of torch, numpy, transformers, safetensors and networkx ended up in sys.modules.
Target (issue 11): `alg check` of a small recipe under 0.5 s wall, with none of torch,
numpy and transformers imported. Exit status 1 with `--strict` if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "transformers", "safetensors", "networkx")
FORBIDDEN = ("torch", "numpy", "transformers")  # the target: none of these at start-up
TARGET_S = 0.5

RECIPES = {
    "small.alg": "x = 1 + 2\nprint(x)\n",
    "lerp.alg": 'a = load("a")\nb = load("b")\nsave(lerp(a, b, 0.3), "out")\n',
    "merge.alg": (
        'a = load("a")\nb = load("b")\n'
        'save(ties(a, [a, b], 1.0, density=0.5), "out-ties")\n'
        'save(slerp(a, b, 0.5), "out-slerp")\n'
        'save(merge(a, b, 0.5), "out-merge")\n'
    ),
}
COMMANDS = (("check", "small.alg"), ("check", "lerp.alg"), ("plan", "merge.alg"))

# a two-layer Llama in miniature: (shape, safetensors dtype code, bytes per element)
HIDDEN, VOCAB, LAYERS = 16, 32, 2


def _tensors() -> dict[str, tuple[tuple[int, ...], str, int]]:
    t = {"model.embed_tokens.weight": ((VOCAB, HIDDEN), "F32", 4),
         "model.norm.weight": ((HIDDEN,), "F32", 4),
         "lm_head.weight": ((VOCAB, HIDDEN), "F32", 4)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.self_attn.{proj}.weight"] = ((HIDDEN, HIDDEN), "F32", 4)
        for proj in ("gate_proj", "up_proj"):
            t[f"{p}.mlp.{proj}.weight"] = ((2 * HIDDEN, HIDDEN), "F32", 4)
        t[f"{p}.mlp.down_proj.weight"] = ((HIDDEN, 2 * HIDDEN), "F32", 4)
        t[f"{p}.input_layernorm.weight"] = ((HIDDEN,), "F32", 4)
        t[f"{p}.post_attention_layernorm.weight"] = ((HIDDEN,), "F32", 4)
    return t


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], str, int]], seed: int) -> None:
    """A safetensors file by hand: 8-byte little-endian header length, the JSON header
    (padded with spaces to a multiple of 8), then the data (small varied float32 values)."""
    header, offset = {}, 0
    for name, (shape, code, size) in tensors.items():
        n = size
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    count = offset // 4
    data = struct.pack(f"<{count}f", *(((i * 7919 + seed * 104729) % 1000 - 500) / 1e4 for i in range(count)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": VOCAB, "torch_dtype": "float32",
              "tie_word_embeddings": False}
    for seed, name in enumerate(("a", "b"), start=1):
        write_safetensors(work / name / "model.safetensors", _tensors(), seed)
        (work / name / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in RECIPES.items():
        (work / name).write_text(text)


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["ALG_CACHE"] = str(work / "cache")
    return env


def timed(cmd: list[str], work: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, env=_env(work), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


IMPORTED = """
import sys
from algebra.cli import main
code = main({argv!r})
print("HEAVY " + " ".join(m for m in {heavy!r} if m in sys.modules))
sys.exit(code)
"""


def imported(command: str, recipe: str, work: Path) -> list[str]:
    code = IMPORTED.format(argv=[command, recipe], heavy=HEAVY)
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=_env(work), capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("HEAVY")]
    if r.returncode != 0 or not line:
        sys.exit(f"{command} {recipe} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return line[-1].split()[1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/alg-bench-startup", help="work directory")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per command (median)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args()
    work = Path(args.dir)
    prepare(work)
    bare_wall = statistics.median(timed([sys.executable, "-c", "pass"], work)[0] for _ in range(args.repeat))
    print(f"python -c pass: {bare_wall:.3f} s wall (the interpreter's own floor)")
    ok = True
    for command, recipe in COMMANDS:
        cmd = [sys.executable, "-m", "algebra", command, recipe]
        timed(cmd, work)  # warm-up: bytecode and parser caches
        runs = [timed(cmd, work) for _ in range(args.repeat)]
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        heavy = imported(command, recipe, work)
        bad = [m for m in heavy if m in FORBIDDEN]
        if command == "check" and recipe == "small.alg" and wall >= TARGET_S:
            ok = False
        ok = ok and not bad
        print(f"alg {command} {recipe}: median {wall:.3f} s wall, {cpu:.3f} s CPU over {args.repeat} runs; "
              f"heavy modules imported: {', '.join(heavy) or 'none'}")
    print(f"target: alg check of a small recipe under {TARGET_S} s wall, without {', '.join(FORBIDDEN)}: "
          f"{'met' if ok else 'MISSED'}")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    raise SystemExit(main())
