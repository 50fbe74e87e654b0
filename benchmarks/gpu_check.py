#!/usr/bin/env python3
"""The GPU path, checked against the CPU path: one script, at most 5 minutes on one GPU.

    python benchmarks/gpu_check.py [--out results.json] [--dir WORKDIR]
                                   [--mergekit-python /path/to/mergekit/venv/bin/python]
                                   [--device cuda:0] [--repeat 1] [--toy]

It builds synthetic inputs in WORKDIR (default: a temporary folder): a bf16 Llama base and
two fine-tunes (base + a seeded task vector), 133M parameters each (with --toy: a few
thousand), and a bf16 Llama sequence-classification reward model with its tokenizer
(algebra/tiny.py), then:

Checks (a failed check makes the exit status 1):
  merges     lerp, linear, task_arithmetic, ties, dare_ties, della and ramplus_tl of the
             three checkpoints, computed in float32 and saved as float32 (so that no
             rounding to bf16 hides a difference), once on the CPU and once on the GPU:
             every output tensor must be bit-identical. For the last four the script also
             counts the entries left at the base value on one device and not on the other
             (which entries were selected/drawn).
  draws      DARE/DELLA's generator (algebra.ops.sparse.draws, counter-based and computed
             on the device of the tensor, not by a CPU-side torch.Generator): 2^24 draws
             on the GPU, on both sides of the 2^32 index boundary, equal to the CPU's.
  scoring    a reward model stored in bf16 scores on the GPU in bf16 and on the CPU in
             float32 (reward.plan.scoring_dtype); every score must satisfy
             |s_gpu - s_cpu| <= SCORE_ATOL + SCORE_RTOL * max|s_cpu|.
The CPU side is checked too, so that the script is exercised without a GPU. Without CUDA:
the CPU merges are bit-identical to the same merges streamed in small chunks (65536
elements; 4096 with --toy). Everywhere: lerp is within float32 rounding of a float64
reference computed here; the CPU draws equal the documented formula (ops/sparse.py's
docstring) evaluated in pure Python; alg's CPU scores equal a plain transformers float32
forward pass within 1e-4.

Timings (GPU only): wall time of `alg run` on the GPU (a child process, start-up included)
for lerp and TIES of the three checkpoints with bf16 output, and for scoring the texts
(cold score cache), with the in-process times of the checks' CPU and GPU runs; with
--mergekit-python, mergekit-yaml --cuda on the same merges (linear 0.7/0.3 for lerp; TIES
with the same weights and density).

Without CUDA the GPU parts are skipped with one line starting "SKIP GPU:" and the exit
status is 0 when the CPU checks pass. Results are printed as a table and, with --out,
written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SKIP_MESSAGE = ("SKIP GPU: no CUDA device here (torch.cuda.is_available() is False); the CPU checks "
                "ran, the GPU checks and timings did not")

# bf16 keeps 8 significant bits (relative rounding 2^-9); through a few layers of a small
# model the score moves by about 1% of its scale
SCORE_ATOL, SCORE_RTOL = 0.02, 0.02
REF_SCORE_TOL = 1e-4  # alg's CPU float32 scores against a plain float32 forward pass

SIZES = {
    # vocab, hidden, intermediate, layers, heads, kv heads; reward model hidden, layers; texts
    "full": dict(vocab=32000, hidden=1024, inter=2816, layers=6, heads=16, kv=4,
                 rm_hidden=512, rm_layers=4, texts=512, small_chunk=1 << 16),
    "toy": dict(vocab=256, hidden=64, inter=128, layers=2, heads=4, kv=2,
                rm_hidden=64, rm_layers=2, texts=12, small_chunk=4096),
}

MERGES = {  # name -> (expression, what is compared beyond the bytes)
    "lerp": ("lerp(a, b, 0.3)", "linear"),
    "linear": ("linear([a, b], [0.6, 0.4])", "linear"),
    "task_arithmetic": ("task_arithmetic(base, [a, b], [0.7, 0.5])", "linear"),
    "ties": ("ties(base, [a, b], [0.6, 0.4], 0.5)", "selection"),
    "dare_ties": ("dare_ties(base, [a, b], [0.6, 0.4], 0.5, seed=7)", "draws"),
    "della": ("della(base, [a, b], [0.6, 0.4], 0.5, epsilon=0.1, seed=7)", "draws"),
    "ramplus_tl": ("ramplus_tl(base, [a, b])", "selection"),
}
WEIGHTS, DENSITY = (0.6, 0.4), 0.5
PREFIX = 'base = load("base")\na = load("ft1")\nb = load("ft2")\n'


# ---- inputs -------------------------------------------------------------------------------------


def llama_specs(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    kv = s["kv"] * (s["hidden"] // s["heads"])
    h, i = s["hidden"], s["inter"]
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]


def llama_config(s: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
            "hidden_size": s["hidden"], "intermediate_size": s["inter"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"], "vocab_size": s["vocab"],
            "head_dim": s["hidden"] // s["heads"], "hidden_act": "silu", "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2}


def build_inputs(work: Path, size: str) -> dict:
    """base, ft1, ft2 (bf16 safetensors + config.json) and rm/ (reward model) under work;
    reused when work already holds them for this size."""
    from safetensors.torch import save_file

    s = SIZES[size]
    marker = work / "inputs.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"size": size, "format": 1}:
        return s
    for name in ("base", "ft1", "ft2", "rm", "_rm", "texts.jsonl", "inputs.json"):
        p = work / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {}
    for name, shape in llama_specs(s):
        t = torch.randn(shape, generator=g).mul_(0.02)
        base[name] = (t.add_(1.0) if name.endswith("norm.weight") else t).to(torch.bfloat16)
    for folder, seed in (("base", None), ("ft1", 1), ("ft2", 2)):
        if seed is None:
            state = base
        else:
            gs = torch.Generator().manual_seed(seed)
            state = {n: (t.float() + torch.randn(t.shape, generator=gs).mul_(0.002)).to(torch.bfloat16)
                     for n, t in base.items()}
        (work / folder).mkdir(parents=True)
        save_file(state, str(work / folder / "model.safetensors"), metadata={"format": "pt"})
        (work / folder / "config.json").write_text(json.dumps(llama_config(s), indent=2) + "\n")
        del state
    del base
    from algebra.tiny import CORPUS, build_family

    fam = build_family(work / "_rm", hidden=s["rm_hidden"], layers=s["rm_layers"], dtype=torch.bfloat16,
                       names=("policy", "rm"))
    fam["rm"].rename(work / "rm")
    shutil.rmtree(work / "_rm")
    with open(work / "texts.jsonl", "w") as f:
        for k in range(s["texts"]):
            a, b = CORPUS[k % len(CORPUS)], CORPUS[(3 * k + 1) % len(CORPUS)]
            f.write(json.dumps({"prompt": a, "response": " ".join(b.split()[: 3 + k % 7])}) + "\n")
    marker.write_text(json.dumps({"size": size, "format": 1}))
    return s


# ---- merges ------------------------------------------------------------------------------------


def interpreter(work: Path, device: str, chunk: int | None = None):
    from algebra import Interpreter, Options

    kw = {"chunk_elems": chunk} if chunk else {}
    return Interpreter(options=Options(device=device, force=True, warn=lambda d: None, out=lambda s: None, **kw), base_dir=work)


def run_merges(work: Path, device: str, tag: str, chunk: int | None = None) -> tuple[Path, float]:
    out = work / f"out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    text = PREFIX + "".join(f'save({e}, "{out / name}", dtype="float32")\n' for name, (e, _) in MERGES.items())
    t0 = time.perf_counter()
    interpreter(work, device, chunk).eval(text)
    return out, time.perf_counter() - t0


def read(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare_folders(x: Path, y: Path, base: dict[str, torch.Tensor] | None) -> dict:
    """Bitwise comparison of two saved merges, tensor by tensor; with base, also how many
    entries are left at the base value on one side only."""
    tx, ty = read(x), read(y)
    row = {"tensors": len(tx), "elements": 0, "differing": 0, "max_abs_diff": 0.0,
           "same_names": sorted(tx) == sorted(ty)}
    if base is not None:
        row["at_base_differing"] = 0
    for name in sorted(set(tx) & set(ty)):
        a, b = tx[name], ty[name]
        row["elements"] += a.numel()
        if a.shape != b.shape or a.dtype != b.dtype:
            row["differing"] += a.numel()
            continue
        ne = a.view(torch.uint8).view(-1, a.element_size()).ne(b.view(torch.uint8).view(-1, b.element_size())).any(1)
        k = int(ne.sum())
        if k:
            row["differing"] += k
            row["max_abs_diff"] = max(row["max_abs_diff"], float((a.double() - b.double()).abs().max()))
        if base is not None:
            ref = base[name].float()
            row["at_base_differing"] += int(((a == ref) != (b == ref)).sum())
    row["ok"] = row["same_names"] and row["differing"] == 0 and not row.get("at_base_differing")
    return row


def merge_checks(work: Path, left: tuple[Path, str], right: tuple[Path, str]) -> list[dict]:
    base = read(work / "base")
    rows = []
    for name, (_, kind) in MERGES.items():
        r = compare_folders(left[0] / name, right[0] / name, base if kind != "linear" else None)
        rows.append({"check": f"{name}: {left[1]} vs {right[1]}", "kind": "bit-identical", **r})
    return rows


def lerp_reference_check(work: Path, out: Path) -> dict:
    """alg's float32 lerp against 0.7a + 0.3b in float64: within float32 rounding of a
    two-term sum, |x - ref| <= 4 eps (|0.7a| + |0.3b|) (cancellation makes a bound on
    |ref| alone too tight)."""
    a, b, got = read(work / "ft1"), read(work / "ft2"), read(out / "lerp")
    worst = 0.0
    for n, x in got.items():
        xa, xb = a[n].double() * 0.7, b[n].double() * 0.3
        scale = (xa.abs() + xb.abs()).clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, float(((x.double() - (xa + xb)).abs() / scale).max()))
    tol = 4 * torch.finfo(torch.float32).eps
    return {"check": "lerp: cpu vs float64 reference", "kind": f"|diff| / (|0.7a| + |0.3b|) <= {tol:.2e}",
            "max_rel_err": worst, "ok": worst <= tol}


# ---- the generator -----------------------------------------------------------------------------


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def draw_formula(e: int, key: tuple[int, int]) -> int:
    """ops/sparse.py's documented draw, in Python integers."""
    return _fmix32(_fmix32((e & 0xFFFFFFFF) ^ key[0]) ^ (e >> 32) ^ key[1]) >> 8


def draw_checks(device: str | None) -> list[dict]:
    from algebra.ops.sparse import draws, rng_key

    key = rng_key(7, "model.layers.0.mlp.up_proj.weight", 1)
    starts = (0, (1 << 32) - 2048)  # both sides of the 2^32 boundary (the high word enters)
    rows = []
    cpu = {e0: draws(e0, 4096, key, torch.device("cpu")) for e0 in starts}
    bad = sum(int(cpu[e0][j]) != draw_formula(e0 + j, key) for e0 in starts for j in range(4096))
    rows.append({"check": "draws: cpu vs documented formula", "kind": "identical", "elements": 2 * 4096,
                 "differing": bad, "ok": bad == 0})
    if device is not None:
        n, bad = 1 << 24, 0
        for e0 in starts:
            g = draws(e0, n, key, torch.device(device)).cpu()
            bad += int((g != draws(e0, n, key, torch.device("cpu"))).sum())
        rows.append({"check": f"draws: {device} vs cpu", "kind": "identical", "elements": 2 * n,
                     "differing": bad, "ok": bad == 0})
    return rows


# ---- scoring -----------------------------------------------------------------------------------

SCORE_RECIPE = 'r = reward("rm", template="{{prompt}}\\n{{response}}")\nscore(r, "texts.jsonl", "{out}")\n'


def run_scores(work: Path, device: str, tag: str) -> tuple[list[float], float]:
    out = work / f"scores-{tag}.jsonl"
    out.unlink(missing_ok=True)
    cache = work / f"cache-{tag}"
    shutil.rmtree(cache, ignore_errors=True)
    old = os.environ.get("ALG_CACHE")
    os.environ["ALG_CACHE"] = str(cache)  # a cold cache: nothing scored before counts
    try:
        t0 = time.perf_counter()
        interpreter(work, device).eval(SCORE_RECIPE.format(out=out))
        dt = time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("ALG_CACHE", None)
        else:
            os.environ["ALG_CACHE"] = old
    return [json.loads(line)["reward"] for line in out.read_text().splitlines()], dt


def reference_scores(work: Path) -> list[float]:
    """A plain transformers forward pass in float32 on the CPU, one text at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(work / "rm", dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for line in (work / "texts.jsonl").read_text().splitlines():
            row = json.loads(line)
            ids = tok(f"{row['prompt']}\n{row['response']}", return_tensors="pt", add_special_tokens=True)
            out.append(float(model(**ids).logits[0, 0]))
    return out


def score_row(check: str, x: list[float], y: list[float], atol: float, rtol: float) -> dict:
    scale = max(abs(v) for v in y) if y else 0.0
    diff = max((abs(a - b) for a, b in zip(x, y, strict=True)), default=0.0)
    tol = atol + rtol * scale
    pairs = [(i, j) for i in range(len(y)) for j in range(i + 1, len(y)) if y[i] != y[j]]
    agree = sum((x[i] > x[j]) == (y[i] > y[j]) for i, j in pairs) / len(pairs) if pairs else 1.0
    return {"check": check, "kind": f"|diff| <= {atol:g} + {rtol:g} * max|ref| = {tol:.4g}", "texts": len(y),
            "max_abs_diff": diff, "score_scale": scale, "pair_order_agreement": agree,
            "ok": len(x) == len(y) and diff <= tol}


# ---- timings (GPU) -----------------------------------------------------------------------------


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return {"wall_s": time.perf_counter() - t0, "rc": p.returncode,
            "error": p.stderr[-2000:] if p.returncode else None}


def mergekit_ok(python: str | None, env: dict) -> str | None:
    """None when mergekit imports with `python`, else why not."""
    if not python:
        return "no --mergekit-python given"
    try:
        p = subprocess.run([python, "-c", "import mergekit"], env=env, capture_output=True, text=True)
    except OSError as e:
        return str(e)
    return None if p.returncode == 0 else p.stderr.strip().splitlines()[-1]


def mergekit_configs(work: Path) -> dict[str, str]:
    """mergekit-yaml configs of the timed merges: linear 0.7/0.3 is lerp(ft1, ft2, 0.3)."""
    models = "".join(f"  - model: {work / n}\n    parameters: {{weight: {w}, density: {DENSITY}}}\n"
                     for n, w in zip(("ft1", "ft2"), WEIGHTS, strict=True))
    return {
        "lerp": (f"merge_method: linear\nmodels:\n  - model: {work / 'ft1'}\n    parameters: {{weight: 0.7}}\n"
                 f"  - model: {work / 'ft2'}\n    parameters: {{weight: 0.3}}\n"
                 "dtype: float32\nout_dtype: bfloat16\n"),
        "ties": (f"merge_method: ties\nbase_model: {work / 'base'}\nmodels:\n{models}"
                 "parameters: {normalize: true}\ndtype: float32\nout_dtype: bfloat16\n"),
    }


def timings(work: Path, device: str, repeat: int, mk_python: str | None) -> tuple[list[dict], list[str]]:
    notes: list[str] = []
    env = {**os.environ, "ALG_CACHE": str(work / "alg-cache"), "PYTHONPATH": str(ROOT)}
    recipes = {
        "lerp": 'save(lerp(load("ft1"), load("ft2"), 0.3), "t-out/lerp")\n',
        "ties": f'save(ties(load("base"), [load("ft1"), load("ft2")], {list(WEIGHTS)}, {DENSITY}), "t-out/ties")\n',
    }
    rows = []
    for what, text in recipes.items():
        (work / f"t-{what}.alg").write_text(text)
        for k in range(repeat):
            r = timed([sys.executable, "-m", "algebra", "run", f"t-{what}.alg", "--device", device, "--force",
                       "--quiet"], work, env)
            rows.append({"what": what, "tool": "alg run", "device": device, "run": k + 1, **r})
    (work / "t-score.alg").write_text(SCORE_RECIPE.format(out="t-out/scores.jsonl"))
    n_texts = len((work / "texts.jsonl").read_text().splitlines())
    for k in range(repeat):
        cache = work / f"t-cache-{k}"
        shutil.rmtree(cache, ignore_errors=True)
        r = timed([sys.executable, "-m", "algebra", "run", "t-score.alg", "--device", device, "--force", "--quiet"],
                  work, {**env, "ALG_CACHE": str(cache)})
        rows.append({"what": f"score {n_texts} texts", "tool": "alg run", "device": device, "run": k + 1, **r,
                     "texts_per_s": n_texts / r["wall_s"]})
    mk_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    why = mergekit_ok(mk_python, mk_env)
    if why is not None:
        notes.append(f"mergekit timings skipped: {why}")
        return rows, notes
    configs = mergekit_configs(work)
    for what, cfg in configs.items():
        yml = work / f"mk-{what}.yml"
        yml.write_text(cfg)
        for k in range(repeat):
            out = work / "t-out" / f"mk-{what}"
            shutil.rmtree(out, ignore_errors=True)
            r = timed([mk_python, "-m", "mergekit.scripts.run_yaml", str(yml), str(out), "--cuda",
                       "--no-copy-tokenizer", "--quiet", "--out-shard-size", "5B"], work, mk_env)
            rows.append({"what": what, "tool": "mergekit-yaml --cuda", "device": device, "run": k + 1, **r})
    return rows, notes


# ---- report ------------------------------------------------------------------------------------


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    cells = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells[1:]]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "ok" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.4g}" if v and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.4f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See benchmarks/README.md.")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--device", default="cuda", help="the GPU to check (default cuda)")
    ap.add_argument("--mergekit-python", default=None, metavar="PATH",
                    help="a Python that imports mergekit, for mergekit-yaml --cuda timings")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per contender (default 1)")
    ap.add_argument("--toy", action="store_true", help="tiny inputs (seconds; for tests)")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    size = "toy" if args.toy else "full"
    gpu = torch.cuda.is_available()
    tmp = None
    work = args.dir
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="alg-gpu-check-")
        work = Path(tmp.name)
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ALG_CACHE", str(work / "alg-cache"))
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
                    "python": platform.python_version(), "torch": torch.__version__, "size": size,
                    "gpu": gpu, "device": None, "skipped": None, "checks": [], "timings": [], "notes": []}
    try:
        from algebra.errors import AlgError
        from algebra.execute import resolve_device

        if gpu:
            try:
                dev = resolve_device(args.device)
            except AlgError as e:
                print(f"gpu_check: {e.message}", file=sys.stderr)
                return 2
            if dev.type != "cuda":
                print(f"gpu_check: --device {args.device} is not a CUDA device", file=sys.stderr)
                return 2
            device = str(dev)
            result["device"] = f"{device}: {torch.cuda.get_device_name(dev)}"
        else:
            device = None
            result["skipped"] = SKIP_MESSAGE
            print(SKIP_MESSAGE, flush=True)
        t0 = time.perf_counter()
        s = build_inputs(work, size)
        n_params = sum(math.prod(shape) for _, shape in llama_specs(s))
        result["inputs"] = {"params": n_params, "dtype": "bf16", "build_s": time.perf_counter() - t0}
        print(f"inputs: base + 2 fine-tunes, {n_params:,} parameters each (bf16), and a bf16 reward model, "
              f"in {work}", flush=True)

        checks = result["checks"]
        cpu_out, cpu_s = run_merges(work, "cpu", "cpu")
        result["notes"].append(f"in-process: the six merges took {cpu_s:.2f} s on the cpu")
        if device is None:  # the comparison machinery, exercised where the GPU's is not
            small = s["small_chunk"]  # other chunk boundaries (4096 is Options' floor)
            small_out, _ = run_merges(work, "cpu", "cpu-small", small)
            checks += merge_checks(work, (cpu_out, "cpu"), (small_out, f"cpu chunk={small}"))
        checks.append(lerp_reference_check(work, cpu_out))
        if device is not None:
            gpu_out, gpu_s = run_merges(work, device, "gpu")
            result["notes"].append(f"in-process: the six merges took {gpu_s:.2f} s on {device}")
            checks += merge_checks(work, (gpu_out, device), (cpu_out, "cpu"))
        checks += draw_checks(device)
        cpu_scores, cpu_score_s = run_scores(work, "cpu", "cpu")
        checks.append(score_row("scores: alg cpu float32 vs transformers float32", cpu_scores,
                                reference_scores(work), REF_SCORE_TOL, 0.0))
        result["notes"].append(f"in-process: scoring {len(cpu_scores)} texts took {cpu_score_s:.2f} s on the cpu")
        if device is not None:
            gpu_scores, gpu_score_s = run_scores(work, device, "gpu")
            checks.append(score_row(f"scores: alg {device} bf16 vs cpu float32", gpu_scores, cpu_scores,
                                    SCORE_ATOL, SCORE_RTOL))
            result["notes"].append(f"in-process: scoring {len(gpu_scores)} texts took {gpu_score_s:.2f} s "
                                   f"on {device}")
            rows, notes = timings(work, device, args.repeat, args.mergekit_python)
            result["timings"], result["notes"] = rows, result["notes"] + notes

        print()
        print(table(checks, [("check", "check"), ("kind", "criterion"), ("elements", "elements"),
                             ("differing", "differing"), ("at_base_differing", "at base, one side only"),
                             ("max_abs_diff", "max |diff|"), ("max_rel_err", "max rel err"), ("ok", "result")]))
        if result["timings"]:
            print()
            print(table(result["timings"], [("what", "what"), ("tool", "tool"), ("device", "device"),
                                            ("run", "run"), ("wall_s", "wall s"), ("texts_per_s", "texts/s"),
                                            ("rc", "exit")]))
        for note in result["notes"]:
            print(f"- {note}")
        if result["skipped"]:
            print(SKIP_MESSAGE)
        result["ok"] = all(c["ok"] for c in checks) and all(t["rc"] == 0 for t in result["timings"])
        result["total_s"] = time.perf_counter() - started
        print(f"{'all checks passed' if result['ok'] else 'SOME CHECKS FAILED'} "
              f"({len(checks)} checks, {result['total_s']:.1f} s)")
        return 0 if result["ok"] else 1
    finally:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
