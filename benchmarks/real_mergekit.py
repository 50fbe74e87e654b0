#!/usr/bin/env python3
"""mergekit against `alg convert mergekit` + `alg run` on the real model: SmolLM2-135M-
Instruct (bf16) and its two real fine-tunes (tests/real/build.py: ft1 trained layers 25
and 26, ft2 layers 26 and 28; built once and cached).

For each method it writes one mergekit config on those folders (dtype and out_dtype
float32, so that a difference is one of semantics, not of bf16 rounding), runs
`mergekit-yaml` and `alg run` on it as separate processes, one after the other, and prints
each one's wall time and peak resident memory (the process's, torch's own included),
the largest absolute difference between the two outputs and the share of entries
that differ by more than 1e-6.

    python benchmarks/real_mergekit.py --mergekit-venv /some/venv [--methods ram,arcee_fusion]
    python benchmarks/real_mergekit.py --mergekit-venv /some/venv --chat-templates

With --chat-templates it instead merges base and ft1 linearly once per `chat_template`
value (the names, "auto", a template's text), with each tool copying the tokenizer, loads
both outputs' tokenizers in transformers and compares what they render for a few
conversations.

mergekit lives in a venv of its own: `python3 -m venv /some/venv && /some/venv/bin/pip
install torch==2.13.0 mergekit`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

# method -> its config, without dtypes; "base", "ft1", "ft2" name the real folders
CONFIGS = {
    "linear": "models:\n  - {model: ft1, parameters: {weight: 0.6}}\n  - {model: ft2, parameters: {weight: 0.4}}\n",
    "ties": "models:\n  - {model: ft1, parameters: {weight: 1.0, density: 0.3}}\n"
            "  - {model: ft2, parameters: {weight: 0.8, density: 0.3}}\nbase_model: base\n",
    "slerp": "models: [{model: base}, {model: ft1}]\nbase_model: base\nparameters: {t: 0.4}\n",
    "ram": "models: [{model: ft1}, {model: ft2}]\nbase_model: base\n",
    "ramplus_tl": "models: [{model: ft1}, {model: ft2}]\nbase_model: base\nparameters: {r: 0.5, alpha: 2.0}\n",
    "arcee_fusion": "models: [{model: base}, {model: ft1}]\nbase_model: base\n",
}


# runs a command and prints its peak RSS (KB): a fresh process per measurement, so that
# RUSAGE_CHILDREN's maximum is that command's alone
_WRAP = ("import resource, subprocess, sys\n"
         "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command, run as its own process."""
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _WRAP, *cmd], check=True, capture_output=True, text=True)
    return time.perf_counter() - t, int(run.stdout.split()[-1]) / 1024


TEMPLATES = ("chatml", "llama3", "auto", "'{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\\n{% endfor %}'")
CONVERSATIONS = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
)


def chat_templates(args, real, work: Path) -> int:
    """The output tokenizers' renderings, mergekit's against alg's, per chat_template."""
    from transformers import AutoTokenizer

    print("| chat_template | renderings equal | first difference (mergekit / alg) |")
    print("|---|--:|---|")
    for k, value in enumerate(TEMPLATES):
        folder = work / f"chat{k}"
        folder.mkdir(exist_ok=True)
        cfg = folder / "config.yml"
        cfg.write_text(f"merge_method: linear\nmodels:\n  - {{model: {real['base']}, parameters: {{weight: 0.5}}}}\n"
                       f"  - {{model: {real['ft1']}, parameters: {{weight: 0.5}}}}\nchat_template: {value}\n")
        recipe = folder / "merge.alg"
        subprocess.run([sys.executable, "-m", "algebra", "convert", "mergekit", str(cfg), "-o", str(recipe)],
                       check=True, cwd=ROOT)
        subprocess.run([str(args.mergekit_venv / "bin" / "mergekit-yaml"), str(cfg), str(folder / "mergekit"),
                        "--quiet"], check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "algebra", "run", str(recipe), "--force", "--set",
                        f"out={folder / 'alg'}"], check=True, capture_output=True)
        toks = [AutoTokenizer.from_pretrained(folder / side) for side in ("mergekit", "alg")]
        same, first = 0, ""
        renders = [(c, g) for c in CONVERSATIONS for g in (False, True)]
        for conv, gen in renders:
            a, b = (t.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) for t in toks)
            same += a == b
            if a != b and not first:
                at = next(i for i in range(min(len(a), len(b)) + 1) if a[i:i + 1] != b[i:i + 1])
                first = f"at {at}: {a[at:at + 24]!r} / {b[at:at + 24]!r}"
        print(f"| `{value}` | {same} of {len(renders)} | {first} |", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-venv", type=Path, required=True)
    ap.add_argument("--methods", default=",".join(CONFIGS), help="comma-separated (default: all)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--chat-templates", action="store_true", help="compare chat_template handling instead")
    args = ap.parse_args()

    from conformance_mergekit import compare, load_dir
    from real import build

    real = build.ensure()
    work = args.work or Path(tempfile.mkdtemp(prefix="alg-real-mk-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.chat_templates:
        return chat_templates(args, real, work)
    print("| method | mergekit | alg | max abs diff | entries differing (> 1e-06) |")
    print("|---|--:|--:|--:|--:|")
    for method in args.methods.split(","):
        text = CONFIGS[method] + f"merge_method: {method}\ndtype: float32\nout_dtype: float32\n"
        for name in ("base", "ft1", "ft2"):
            text = text.replace(f"model: {name}", f"model: {real[name]}").replace(
                f"base_model: {name}", f"base_model: {real[name]}")
        folder = work / method
        folder.mkdir(exist_ok=True)
        cfg = folder / "config.yml"
        cfg.write_text(text)
        recipe = folder / "merge.alg"
        subprocess.run([sys.executable, "-m", "algebra", "convert", "mergekit", str(cfg), "-o", str(recipe)],
                       check=True, cwd=ROOT)
        mk = timed([str(args.mergekit_venv / "bin" / "mergekit-yaml"), str(cfg), str(folder / "mergekit"),
                    "--no-copy-tokenizer", "--quiet"])
        alg = timed([sys.executable, "-m", "algebra", "run", str(recipe), "--force",
                     "--set", f"out={folder / 'alg'}"])
        worst, share, note = compare(load_dir(folder / "alg"), load_dir(folder / "mergekit"))
        print(f"| {method} | {mk[0]:.1f} s, {mk[1]:.0f} MB | {alg[0]:.1f} s, {alg[1]:.0f} MB | {worst:.2e} "
              f"| {100 * share:.3f}% {note}|", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
