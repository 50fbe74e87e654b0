#!/usr/bin/env python3
"""Conformance of `alg convert mergekit` + `alg run` with mergekit itself.

mergekit lives in a venv of its own (it pins its own dependencies):

    python3 -m venv /some/venv && /some/venv/bin/pip install torch==2.13.0 mergekit

Then, from the repository root (the examples are mergekit's repository's examples/*.yml):

    python benchmarks/conformance_mergekit.py --mergekit-python /some/venv/bin/python \\
        --examples /path/to/mergekit/examples

It builds tiny float32 Llama checkpoints (algebra/tiny.py: 40 layers, so that the examples'
layer ranges fit, hidden size 16) and merges each config twice on them: with mergekit's
own `run_merge` (one process in mergekit's venv for all configs) and with
`alg convert mergekit` + `alg run` (float32). The configs are mergekit's examples, with
their model references replaced by the tiny checkpoints (base_model -> base, the others ->
a, b, c in turn) and `dtype: float32` (so that a difference is one of semantics, not of
float16 rounding), and one float32 config per method and per notable setting, written
below. For each it prints the largest absolute difference over all tensors and the share
of entries that differ by more than 1e-6; a row that is expected to differ names its
departure, as documented in docs/mergekit.md. The exit status is 1 when a row that should
match does not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOL = 1e-6  # float32 merges of deterministic methods: everything within this

# One config per method and notable setting; `base`, `a`, `b`, `c` are the tiny models.
# A value of DEPARTURES says why that row is expected to differ (docs/mergekit.md).
PER_METHOD: dict[str, str] = {
    "linear": """
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: b, parameters: {weight: 0.3}}
  - {model: c, parameters: {weight: 0.2}}
merge_method: linear
""",
    "linear normalize:false": """
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: b, parameters: {weight: 0.3}}
merge_method: linear
parameters: {normalize: false}
""",
    "task_arithmetic lambda": """
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: b, parameters: {weight: 0.3}}
merge_method: task_arithmetic
base_model: base
parameters: {lambda: 0.8}
""",
    "task_arithmetic normalize:true": """
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: b, parameters: {weight: 0.3}}
merge_method: task_arithmetic
base_model: base
parameters: {normalize: true}
""",
    "ties": """
models:
  - {model: a, parameters: {weight: 0.6, density: 0.5}}
  - {model: b, parameters: {weight: 0.4, density: 0.3}}
merge_method: ties
base_model: base
""",
    "ties gradients, normalize:false": """
models:
  - {model: a, parameters: {weight: [0.2, 1.0], density: [1, 0.5, 0.2]}}
  - model: b
    parameters:
      density: 0.5
      weight: [{filter: mlp, value: 0.5}, {value: 0.3}]
merge_method: ties
base_model: base
parameters: {normalize: false}
""",
    "dare_linear density 1": """
models:
  - {model: a, parameters: {weight: 0.6, density: 1.0}}
  - {model: b, parameters: {weight: 0.3, density: 1.0}}
merge_method: dare_linear
base_model: base
""",
    "dare_linear density 0.5": """
models:
  - {model: a, parameters: {weight: 0.6, density: 0.5}}
  - {model: b, parameters: {weight: 0.3, density: 0.5}}
merge_method: dare_linear
base_model: base
""",
    "dare_ties density 1": """
models:
  - {model: a, parameters: {weight: 0.6, density: 1.0}}
  - {model: b, parameters: {weight: 0.3, density: 1.0}}
merge_method: dare_ties
base_model: base
""",
    "dare_ties density 1, normalize:true": """
models:
  - {model: a, parameters: {weight: 0.6, density: 1.0}}
  - {model: b, parameters: {weight: 0.3, density: 1.0}}
merge_method: dare_ties
base_model: base
parameters: {normalize: true}
""",
    "dare_ties density 0.5": """
models:
  - {model: a, parameters: {weight: 0.6, density: 0.5}}
  - {model: b, parameters: {weight: 0.3, density: 0.5}}
merge_method: dare_ties
base_model: base
""",
    "breadcrumbs": """
models:
  - {model: a, parameters: {weight: 0.6, density: 0.8}}
  - {model: b, parameters: {weight: 0.3, density: 0.7}}
merge_method: breadcrumbs
base_model: base
parameters: {gamma: 0.05}
""",
    "breadcrumbs_ties": """
models:
  - {model: a, parameters: {weight: 0.6, density: 0.8}}
  - {model: b, parameters: {weight: 0.3, density: 0.7}}
merge_method: breadcrumbs_ties
base_model: base
parameters: {gamma: 0.05}
""",
    "breadcrumbs_ties normalize:true": """
models:
  - {model: a, parameters: {weight: 0.6, density: 0.8}}
  - {model: b, parameters: {weight: 0.3, density: 0.7}}
merge_method: breadcrumbs_ties
base_model: base
parameters: {gamma: 0.05, normalize: true}
""",
    "della density 1, epsilon 0": """
models:
  - {model: a, parameters: {weight: 0.6, density: 1.0}}
  - {model: b, parameters: {weight: 0.3, density: 1.0}}
merge_method: della
base_model: base
parameters: {epsilon: 0.0}
""",
    "della density 1": """
models:
  - {model: a, parameters: {weight: 0.6, density: 1.0}}
  - {model: b, parameters: {weight: 0.3, density: 1.0}}
merge_method: della
base_model: base
""",
    "della density 0.5": """
models:
  - {model: a, parameters: {weight: 0.6, density: 0.5}}
  - {model: b, parameters: {weight: 0.3, density: 0.5}}
merge_method: della
base_model: base
parameters: {epsilon: 0.1}
""",
    "della_linear density 1, epsilon 0": """
models:
  - {model: a, parameters: {weight: 0.6, density: 1.0}}
  - {model: b, parameters: {weight: 0.3, density: 1.0}}
merge_method: della_linear
base_model: base
parameters: {epsilon: 0.0}
""",
    "della_linear density 0.5": """
models:
  - {model: a, parameters: {weight: 0.6, density: 0.5}}
  - {model: b, parameters: {weight: 0.3, density: 0.5}}
merge_method: della_linear
base_model: base
parameters: {epsilon: 0.1}
""",
    "model_stock": """
models: [{model: base}, {model: a}, {model: b}, {model: c}]
merge_method: model_stock
base_model: base
""",
    "model_stock filter_wise": """
models: [{model: base}, {model: a}, {model: b}, {model: c}]
merge_method: model_stock
base_model: base
parameters: {filter_wise: true}
""",
    "sce": """
models: [{model: base}, {model: a}, {model: b}, {model: c}]
merge_method: sce
base_model: base
parameters: {select_topk: 0.5}
""",
    "nuslerp": """
models:
  - {model: a, parameters: {weight: 0.3}}
  - {model: b, parameters: {weight: 0.7}}
merge_method: nuslerp
""",
    "nuslerp base, flatten:false": """
models:
  - {model: a, parameters: {weight: 0.3}}
  - {model: b, parameters: {weight: 0.7}}
merge_method: nuslerp
base_model: base
parameters: {nuslerp_flatten: false}
""",
    "nuslerp row_wise": """
models:
  - {model: a, parameters: {weight: 0.3}}
  - {model: b, parameters: {weight: 0.7}}
merge_method: nuslerp
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
""",
    "multislerp": """
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: b, parameters: {weight: 0.3}}
  - {model: c, parameters: {weight: 0.2}}
merge_method: multislerp
base_model: base
""",
    "karcher": """
models: [{model: a}, {model: b}, {model: c}]
merge_method: karcher
""",
    "nearswap": """
models: [{model: base}, {model: a}]
merge_method: nearswap
base_model: base
parameters: {t: 0.01}
""",
    "slerp gradient": """
models: [{model: base}, {model: a}]
merge_method: slerp
base_model: base
parameters: {t: [0, 0.3, 1]}
""",
    # sa, sb, sc: fine-tunes that update part of each tensor and leave the rest as the
    # base has it (what RAM tells apart); a, b: fine-tunes that update every entry
    "ram": """
models: [{model: sa}, {model: sb}, {model: sc}]
merge_method: ram
base_model: base
""",
    "ram epsilon, dense fine-tunes": """
models: [{model: a}, {model: b}]
merge_method: ram
base_model: base
parameters: {epsilon: 0.01}
""",
    "ramplus_tl": """
models: [{model: sa}, {model: sb}, {model: sc}]
merge_method: ramplus_tl
base_model: base
""",
    "ramplus_tl r, alpha, epsilon per tensor": """
models: [{model: sa}, {model: sb}]
merge_method: ramplus_tl
base_model: base
parameters:
  r: 0.5
  alpha: 1.5
  epsilon: [{filter: mlp, value: 0.01}, {value: 1e-5}]
""",
    "arcee_fusion, sparse fine-tune": """
models: [{model: base}, {model: sb}]
merge_method: arcee_fusion
base_model: base
""",
    "linear of LoRA-adapted models (MODEL+LORA)": """
models:
  - {model: base+lora1, parameters: {weight: 0.6}}
  - {model: a+lora2, parameters: {weight: 0.4}}
merge_method: linear
""",
    "ties over a LoRA-adapted model, base plain": """
models:
  - {model: base+lora1, parameters: {weight: 1.0, density: 0.5}}
  - {model: b, parameters: {weight: 0.5, density: 0.5}}
merge_method: ties
base_model: base
""",
    "passthrough slices, scale": """
slices:
  - sources: [{model: base, layer_range: [0, 24]}]
  - sources: [{model: a, layer_range: [20, 40], parameters: {scale: 0.5}}]
merge_method: passthrough
""",
    "ties slices, gradient per slice": """
slices:
  - sources:
      - {model: base, layer_range: [0, 16]}
      - {model: a, layer_range: [0, 16], parameters: {weight: 0.7}}
      - {model: b, layer_range: [0, 16]}
    parameters: {density: 0.6}
  - sources:
      - {model: base, layer_range: [16, 40]}
      - {model: a, layer_range: [16, 40]}
      - {model: b, layer_range: [16, 40]}
    parameters: {density: [0.2, 0.8]}
merge_method: ties
base_model: base
parameters: {weight: 0.5}
""",
}

RANDOM = "random masks: mergekit's draw is unseeded, alg's seeded (and DARE/DELLA rescale)"
DEPARTURES = {
    "dare_linear density 0.5": RANDOM,
    "dare_ties density 0.5": RANDOM,
    "della density 0.5": RANDOM,
    "della_linear density 0.5": RANDOM,
    "della density 1": "alg's della refuses density + epsilon > 1",
    "model_stock filter_wise": "model_stock's cosine where two task vectors' norms multiply to < 1e-6",
}


def _refs(doc: dict) -> list[str]:
    out = []
    if doc.get("base_model"):
        out.append(doc["base_model"])
    for m in doc.get("models") or []:
        out.append(m["model"])
    for s in doc.get("slices") or []:
        out += [src["model"] for src in s["sources"]]
    return list(dict.fromkeys(out))


def prepare(text: str, family: dict[str, Path]) -> str:
    """The config on the tiny models, in float32."""
    doc = yaml.safe_load(text)
    refs = _refs(doc)
    base = doc.get("base_model")
    names = {r: r for r in refs if all(part in family for part in r.split("+"))}
    rest = [r for r in refs if r not in names and r != base]
    if base is not None and base not in names:
        names[base] = "base"
    for i, r in enumerate(rest):
        names[r] = "abc"[i % 3]
    path = {r: "+".join(str(family[part]) for part in n.split("+")) for r, n in names.items()}

    def swap(x):
        if isinstance(x, dict):
            return {k: (path[v] if k in ("model", "base_model") and v in path else swap(v))
                    for k, v in x.items()}
        if isinstance(x, list):
            return [swap(v) for v in x]
        return x

    doc = swap(doc)
    doc["dtype"] = "float32"
    doc.pop("out_dtype", None)
    return yaml.safe_dump(doc, sort_keys=False)


MK_DRIVER = r"""
import json, sys, traceback
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

opts = MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False, random_seed=0,
                    lora_merge_cache=sys.argv[2])
for job in json.load(open(sys.argv[1])):
    try:
        cfg = MergeConfiguration.model_validate(yaml.safe_load(open(job["config"])))
        run_merge(cfg, job["out"], options=opts)
        print(json.dumps({"label": job["label"], "ok": True}), flush=True)
    except Exception as e:
        print(json.dumps({"label": job["label"], "ok": False, "error": f"{type(e).__name__}: {e}"}),
              flush=True)
"""


def perturb_norms(family: dict[str, Path], names: tuple[str, ...]) -> None:
    """The fine-tunes of algebra.tiny share the base's norm weights (all ones); give them
    their own, so that every tensor (the final norm too) has a task vector."""
    import torch
    from safetensors.torch import load_file, save_file

    for i, n in enumerate(names):
        f = family[n] / "model.safetensors"
        state = load_file(f)
        g = torch.Generator().manual_seed(100 + i)
        for k, v in state.items():
            if v.dim() == 1:
                state[k] = v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        save_file(state, f, metadata={"format": "pt"})


def sparse_finetunes(family: dict[str, Path], names: tuple[str, ...]) -> None:
    """Fine-tunes of the base that update a random 20-50% of each tensor's entries and
    leave the others exactly as the base has them: family[name] for each name."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    base = load_file(family["base"] / "model.safetensors")
    for i, n in enumerate(names):
        folder = family["base"].parent / n
        shutil.copytree(family["base"], folder, dirs_exist_ok=True)
        g = torch.Generator().manual_seed(200 + i)
        state = {}
        for k, v in base.items():
            upd = torch.rand(v.shape, generator=g) < 0.2 + 0.15 * i
            state[k] = torch.where(upd, v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype), v)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        family[n] = folder


def lora_adapters(family: dict[str, Path], on: dict[str, str]) -> None:
    """PEFT LoRA adapters (rank 4 on the attention and MLP projections, lora_B set to
    seeded values as training would leave it) saved by peft: family[name] for each name,
    made on the model on[name]."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    for i, (name, model) in enumerate(on.items()):
        m = AutoModelForCausalLM.from_pretrained(family[model], dtype=torch.float32)
        pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                    target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
        g = torch.Generator().manual_seed(300 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(family["base"].parent / name)
        family[name] = family["base"].parent / name


def load_dir(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(alg: dict, mk: dict) -> tuple[float, float, str]:
    """Largest |alg - mergekit| and the share of entries above TOL; a note when the
    tensor sets or shapes differ."""
    if set(alg) != set(mk):
        only_a, only_m = sorted(set(alg) - set(mk)), sorted(set(mk) - set(alg))
        return float("nan"), float("nan"), f"tensors differ: only alg {only_a[:3]}, only mergekit {only_m[:3]}"
    worst, over, total = 0.0, 0, 0
    for k, m in mk.items():
        a = alg[k]
        if a.shape != m.shape:
            return float("nan"), float("nan"), f"{k}: shape {list(a.shape)} vs {list(m.shape)}"
        d = (a.double() - m.double()).abs()
        worst = max(worst, d.max().item() if d.numel() else 0.0)
        over += int((d > TOL).sum())
        total += d.numel()
    return worst, over / max(total, 1), ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-python", required=True, help="python of a venv with mergekit installed")
    ap.add_argument("--examples", type=Path, help="mergekit's examples/ folder (its *.yml are run)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only the configs whose label contains TEXT (repeatable)")
    args = ap.parse_args()

    from algebra.cli import main as alg
    from algebra.convert import ConvertError, mergekit_to_alg
    from algebra.tiny import build_family

    started = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="alg-mk-"))
    work.mkdir(parents=True, exist_ok=True)
    family = build_family(work / "models", hidden=16, layers=40, names=("base", "a", "b", "c"))
    perturb_norms(family, ("a", "b", "c"))
    sparse_finetunes(family, ("sa", "sb", "sc"))
    lora_adapters(family, {"lora1": "base", "lora2": "a"})

    configs: list[tuple[str, str]] = []
    if args.examples is not None:
        for f in sorted(args.examples.glob("*.yml")):
            configs.append((f.name, f.read_text()))
    configs += [(k, v) for k, v in PER_METHOD.items()]
    if args.only:
        configs = [(k, v) for k, v in configs if any(t in k for t in args.only)]

    jobs, prepared = [], {}
    for i, (label, text) in enumerate(configs):
        folder = work / f"c{i:02d}"
        folder.mkdir(exist_ok=True)
        cfg = prepare(text, family)
        (folder / "config.yml").write_text(cfg)
        prepared[label] = folder
        jobs.append({"label": label, "config": str(folder / "config.yml"), "out": str(folder / "mergekit")})
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "driver.py").write_text(MK_DRIVER)
    run = subprocess.run([args.mergekit_python, str(work / "driver.py"), str(work / "jobs.json"),
                          str(work / "lora-cache")],
                         capture_output=True, text=True)
    mk_status = {}
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            mk_status[r["label"]] = r
    if not mk_status:
        print(run.stderr[-3000:], file=sys.stderr)
        return 2

    rows, bad = [], 0
    for label, _ in configs:
        folder = prepared[label]
        cfg = (folder / "config.yml").read_text()
        method = yaml.safe_load(cfg)["merge_method"]
        mk = mk_status.get(label, {"ok": False, "error": "no result"})
        note = ""
        try:
            recipe = mergekit_to_alg(cfg, name=label)
        except ConvertError as e:
            recipe, note = None, "refused: " + str(e).splitlines()[0]
        if recipe is not None:
            (folder / "merge.alg").write_text(recipe)
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                code = alg(["run", str(folder / "merge.alg"), "--device", "cpu", "--force",
                            "--set", f"out={folder / 'alg'}"])
            if code != 0:
                note = f"alg run failed ({code})"
        worst = share = float("nan")
        if not mk["ok"]:
            note = (note + "; " if note else "") + "mergekit failed: " + mk["error"][:120]
        elif recipe is not None and not note:
            worst, share, note = compare(load_dir(folder / "alg"), load_dir(folder / "mergekit"))
        expected = DEPARTURES.get(label)
        matched = not note and worst <= TOL
        verdict = "match" if matched else (f"departure: {expected}" if expected else "MISMATCH")
        if not matched and not expected:
            bad += 1
        rows.append((label, method, worst, share, verdict, note))

    print(f"| config | method | max abs diff | entries differing (> {TOL:g}) | verdict |")
    print("|---|---|---|---|---|")
    for label, method, worst, share, verdict, note in rows:
        w = "n/a" if worst != worst else f"{worst:.2e}"
        s = "n/a" if share != share else f"{100 * share:.2f}%"
        print(f"| {label} | {method} | {w} | {s} | {verdict}{' (' + note + ')' if note and verdict == 'MISMATCH' else ''} |")
    print(f"\n{len(rows)} configs, {bad} unexpected mismatches, {time.time() - started:.0f} s", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
