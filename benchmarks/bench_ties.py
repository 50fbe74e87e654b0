"""TIES benchmark: `alg run` against mergekit's own `mergekit-yaml`, on a ~1.1B-parameter
bf16 base and two fine-tunes.

    python benchmarks/bench_ties.py            # full size; see benchmarks/README.md

Inputs. The base is bench_lerp.py's synthetic TinyLlama-shaped checkpoint `a` (built by
its generator, reused when present). Two fine-tunes `ties-ft1`, `ties-ft2` are the base
plus seeded normal noise of std 0.002 (a tenth of the weights' std), rounded to bf16,
written tensor by tensor; reused on later runs (ties-inputs.json records how).

Contenders, each computing TIES with weights 0.5, density 0.5, normalised, in float32,
saved as bf16:

  alg        python -m algebra run ties.alg --force, where ties.alg is
             save(ties(load("a"), [load("ties-ft1"), load("ties-ft2")], 0.5, 0.5), "out-ties-alg")
  alg lerp   python -m algebra run lerp.alg --force, where lerp.alg is
             save(lerp(load("a"), load("ties-ft1"), 0.5), "out-lerp-alg"): the same
             inputs streamed once, for the ratio TIES / lerp (--no-lerp skips it)
  mergekit   mergekit-yaml ties.yml out-ties-mk (from a separate venv, --mergekit-venv;
             CPU, defaults otherwise: no lazy unpickling, synchronous writes, dtype float32,
             out_dtype bfloat16). mergekit ranks each task vector with a full argsort.

How: as bench_lerp.py (and with its code): each run is a child process, alternating
which goes first, inputs read once beforehand so that both start with them in page
cache, memory sampled from /proc every 2 ms. Afterwards the outputs are compared: the
fraction of elements that differ and the largest difference, on sampled tensors, and
alg against an independent float64 reference (stable sort by (-|d|, index)) on the
small ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_lerp as bl  # noqa: E402  (the synthetic checkpoints and the measurement)

MB = 10**6
FT_FORMAT = 1
FT_STD = 0.002
WEIGHT, DENSITY = 0.5, 0.5


# ---- inputs ---------------------------------------------------------------------------------


def build_finetune(base: Path, out: Path, seed: int) -> None:
    """base + N(0, FT_STD^2) noise in float32, rounded to bf16, same shards and index."""
    from safetensors import safe_open

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    g = torch.Generator().manual_seed(seed)
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(base / fname, framework="pt") as f:
            names = sorted(f.keys())
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name in names:
                shape = f.get_slice(name).get_shape()
                nbytes = 2 * bl.numel(tuple(shape))
                header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            tmp = (out / fname).with_suffix(".tmp")
            with open(tmp, "wb") as w:
                w.write(len(raw).to_bytes(8, "little") + raw)
                for name in names:
                    t = f.get_tensor(name).float().flatten()
                    t.add_(torch.randn(t.numel(), generator=g).mul_(FT_STD))
                    w.write(t.to(torch.bfloat16).view(torch.uint8).numpy().data)
                    del t
            tmp.rename(out / fname)
    shutil.copy2(base / "model.safetensors.index.json", out / "model.safetensors.index.json")
    shutil.copy2(base / "config.json", out / "config.json")


def ensure_finetunes(work: Path, layers: int) -> tuple[list[Path], bool]:
    base_files, _ = bl.ensure_inputs(work, layers)
    want = {"format": FT_FORMAT, "layers": layers, "std": FT_STD, "seeds": {"ties-ft1": 11, "ties-ft2": 12},
            "base": bl.file_sizes(work / "a")}
    reused = bl.cached_build(work, "ties-inputs.json", want,
                             lambda folder, seed: build_finetune(work / "a", folder, seed), "fine-tune of the base")
    files = [p for p in base_files if p.parent.name == "a"]
    return files + [p for n in want["seeds"] for p in sorted((work / n).glob("*.safetensors"))], reused


# ---- correctness ------------------------------------------------------------------------------


def ties_reference(base: torch.Tensor, fts: list[torch.Tensor]) -> torch.Tensor:
    """TIES in float64 from the formula: top ⌊density N⌋ of each |d_i| by a stable sort
    on (-|d|, index), sign elected from Σ w d', agreeing entries averaged by weight."""
    b = base.double().flatten()
    wd = []
    for ft in fts:
        d32 = ft.float().flatten() - base.float().flatten()  # as alg computes d, in float32
        k = max(1, int(DENSITY * d32.numel()))
        order = torch.sort(-d32.double().abs(), stable=True).indices[:k]
        keep = torch.zeros_like(b, dtype=torch.bool)
        keep[order] = True
        wd.append(WEIGHT * torch.where(keep, d32.double(), 0.0))
    sign = torch.where(sum(wd) >= 0, 1.0, -1.0)
    agree = [torch.sign(x) == sign for x in wd]
    num = sum(torch.where(a, x, 0.0) for a, x in zip(agree, wd, strict=True))
    den = sum(a.double() * WEIGHT for a in agree)
    return (b + num / torch.where(den == 0, 1.0, den)).to(torch.bfloat16).view(base.shape)


def compare(work: Path, layers: int, with_mergekit: bool) -> dict:
    from safetensors import safe_open

    def getter(folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            wmap = json.loads(index.read_text())["weight_map"]
        else:  # one shard, no index (mergekit)
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                wmap = dict.fromkeys(f.keys(), "model.safetensors")
        handles: dict[str, object] = {}

        def get(name: str) -> torch.Tensor:
            f = wmap[name]
            if f not in handles:
                handles[f] = safe_open(folder / f, framework="pt")
            return handles[f].get_tensor(name)

        return get, wmap

    get = {k: getter(work / k) for k in ["a", "ties-ft1", "ties-ft2", "out-ties-alg"]
           + (["out-ties-mk"] if with_mergekit else [])}
    last = layers - 1
    sample = ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.input_layernorm.weight",
              f"model.layers.{last}.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]
    small = {"model.layers.0.self_attn.k_proj.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"}
    out: dict = {"names_equal": set(get["out-ties-alg"][1]) == set(get["a"][1]), "sampled": {}}
    if with_mergekit:
        out["names_equal_mk"] = set(get["out-ties-mk"][1]) == set(get["a"][1])
    for name in sample:
        x = get["out-ties-alg"][0](name)
        row: dict = {}
        if with_mergekit:
            y = get["out-ties-mk"][0](name)
            row["frac_differing_vs_mergekit"] = float((x != y).float().mean())
            row["max_abs_diff_vs_mergekit"] = float((x.float() - y.float()).abs().max())
        if name in small:
            ref = ties_reference(get["a"][0](name), [get["ties-ft1"][0](name), get["ties-ft2"][0](name)])
            row["frac_differing_vs_float64_reference"] = float((x != ref).float().mean())
            row["max_abs_diff_vs_float64_reference"] = float((x.float() - ref.float()).abs().max())
        out["sampled"][name] = row
    return out


# ---- main ---------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See benchmarks/README.md.")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/alg-bench"))
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of alg (default 3)")
    ap.add_argument("--mergekit-repeat", type=int, default=None, help="timed runs of mergekit (default: --repeat)")
    ap.add_argument("--mergekit-venv", type=Path, default=Path("/tmp/mk-venv"),
                    help="a venv holding mergekit (default /tmp/mk-venv); skipped when absent")
    ap.add_argument("--chunk", type=int, default=None, metavar="N")
    ap.add_argument("--interval-ms", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-lerp", action="store_true", help="skip alg's lerp of the same inputs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.dir.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    specs = bl.llama_tensors(args.layers)
    n_params = sum(bl.numel(s) for _, s in specs)
    inputs, reused = ensure_finetunes(work, args.layers)
    print(f"synthetic Llama: {args.layers} layers, {n_params:,} parameters; base + 2 fine-tunes "
          f"({'reused' if reused else 'built'})", flush=True)

    recipe = work / "ties.alg"
    recipe.write_text(f'base = load("a")\nms = [load("ties-ft1"), load("ties-ft2")]\n'
                      f'save(ties(base, ms, {WEIGHT}, {DENSITY}), "out-ties-alg")\n')
    lerp_recipe = work / "lerp-ties-inputs.alg"
    lerp_recipe.write_text(f'save(lerp(load("a"), load("ties-ft1"), {WEIGHT}), "out-lerp-alg")\n')
    mk_yaml = work / "ties.yml"
    mk_yaml.write_text(
        "merge_method: ties\n"
        f"base_model: {work / 'a'}\n"
        "models:\n"
        + "".join(f"  - model: {work / n}\n    parameters: {{weight: {WEIGHT}, density: {DENSITY}}}\n"
                  for n in ("ties-ft1", "ties-ft2"))
        + "parameters: {normalize: true}\ndtype: float32\nout_dtype: bfloat16\n")
    mk_bin = args.mergekit_venv / "bin" / "mergekit-yaml"
    with_mk = mk_bin.is_file()
    outs = {"alg": work / "out-ties-alg", "mergekit": work / "out-ties-mk", "lerp": work / "out-lerp-alg"}
    extra = ["--chunk", str(args.chunk)] if args.chunk else []
    cmds = {
        "alg": [sys.executable, "-m", "algebra", "run", str(recipe), "--force", *extra],
        "lerp": [sys.executable, "-m", "algebra", "run", str(lerp_recipe), "--force", *extra],
        "mergekit": [str(mk_bin), str(mk_yaml), str(outs["mergekit"]), "--no-cuda", "--no-copy-tokenizer",
                     "--no-write-model-card", "--quiet", "--out-shard-size", "1B"],
        "import": [sys.executable, "-c", "import algebra.cli, algebra.interpreter, algebra.execute, time; time.sleep(0.5)"],
    }
    env = {**os.environ, "ALG_CACHE": str(work / "alg-cache")}
    mk_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    def run(kind: str, tag: str) -> dict:
        if kind in outs:
            shutil.rmtree(outs[kind], ignore_errors=True)
        os.sync()
        bl.warm(inputs)
        r = bl.measure(cmds[kind], mk_env if kind == "mergekit" else env, logs / f"{tag}.log",
                       args.interval_ms / 1000)
        print(f"  {tag:<14} {r['wall_s']:8.2f}s wall  {r['cpu_s']:8.2f}s CPU  RssAnon "
              f"{r['peak_rss_anon'] / MB:8.1f} MB  (other processes {r['others_cpu_s']:.1f}s CPU)", flush=True)
        return {"kind": kind, "tag": tag, **r}

    load_start = os.getloadavg()
    predicted, plan_line = bl.predicted_peak(recipe, extra, env)
    print(f"alg plan: {plan_line.strip()}", flush=True)
    raw = [run("import", "import-algebra")]
    if not (work / "alg-cache").exists() or not reused:
        raw.append(run("alg", "alg-first"))  # also hashes new inputs for the model card (cached after)
    mk_repeat = args.mergekit_repeat if args.mergekit_repeat is not None else args.repeat
    for i in range(max(args.repeat, mk_repeat if with_mk else 0)):
        order = ["alg", "lerp", "mergekit"] if i % 2 == 0 else ["mergekit", "lerp", "alg"]
        for kind in order:
            if (kind == "alg" or kind == "lerp" and not args.no_lerp) and i < args.repeat \
                    or kind == "mergekit" and with_mk and i < mk_repeat:
                raw.append(run(kind, f"{kind}-{i + 1}"))
    check = compare(work, args.layers, with_mk)
    if not args.keep:
        for p in outs.values():
            shutil.rmtree(p, ignore_errors=True)

    summary = {k: bl.summarize([r for r in raw if r["kind"] == k and r["tag"] != "alg-first"])
               for k in ("alg", "import")}
    rows = [("`alg run`", summary["alg"])]
    if not args.no_lerp:
        summary["lerp"] = bl.summarize([r for r in raw if r["kind"] == "lerp"])
        rows.append(("`alg run`: lerp of the same inputs", summary["lerp"]))
    if with_mk:
        summary["mergekit"] = bl.summarize([r for r in raw if r["kind"] == "mergekit"])
        rows.append(("`mergekit-yaml` (mergekit 0.1.5)", summary["mergekit"]))
    rows.append(("python importing alg and torch, then sleep 0.5 s", summary["import"]))
    print()
    print(f"## ties(base, [ft1, ft2], {WEIGHT}, {DENSITY}) on {n_params / 1e9:.2f}B-parameter bf16 checkpoints")
    print()
    print(bl.table(rows))
    print()
    alg = summary["alg"]
    print(f"- alg peak RssAnon {alg['peak_rss_anon'] / MB:.0f} MB; above the floor of python + torch: "
          f"{(alg['peak_rss_anon'] - summary['import']['peak_rss_anon']) / MB:.0f} MB; `alg plan` predicts "
          + (f"{predicted / MB:.1f} MB" if predicted else "?"))
    if with_mk:
        print(f"- wall time alg / mergekit (medians): {alg['wall_median_s'] / summary['mergekit']['wall_median_s']:.2f}")
    if not args.no_lerp:
        print(f"- wall time alg TIES / alg lerp (medians): {alg['wall_median_s'] / summary['lerp']['wall_median_s']:.2f}"
              f"; CPU: {alg['cpu_median_s'] / summary['lerp']['cpu_median_s']:.2f}")
    print(f"- outputs: {json.dumps(check, indent=1)}")
    others = max(r["others_cpu_s"] / r["wall_s"] for r in raw)
    print(f"- other processes used up to {others:.0%} of a CPU during a run (the machine is shared); "
          f"load average (1, 5, 15 min) at the start {load_start}, at the end {os.getloadavg()}")
    print(f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}")
    if with_mk:
        mk_version = subprocess.run([str(args.mergekit_venv / "bin" / "python"), "-c",
                                     "import importlib.metadata as m; print(m.version('mergekit'))"],
                                    capture_output=True, text=True, env=mk_env).stdout.strip()
        print(f"- mergekit {mk_version} from {args.mergekit_venv}")
    out_json = args.json or work / "results-ties.json"
    out_json.write_text(json.dumps({"layers": args.layers, "params": n_params, "commands": cmds,
                                    "predicted_peak_bytes": predicted, "runs": raw, "summary": summary,
                                    "check": check}, indent=2) + "\n")
    print(f"\nraw numbers: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
