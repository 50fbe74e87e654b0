#!/usr/bin/env python3
"""Merging a LoRA adapter into its base: `alg run` of `lora(...)` against peft's
`merge_and_unload` + `save_pretrained`, as one would write it by hand, on bench_lerp.py's
1.1B bf16 synthetic Llama `a` (TinyLlama's shapes; built by bench_lerp.py if absent).

    python benchmarks/bench_lora.py [--dir WORKDIR] [--rank 16] [--repeat 2]

The adapter: rank `--rank` (lora_alpha twice that) on every layer's q, k, v, o, gate, up
and down projections, made with peft on the base and saved as peft saves it (float32),
its lora_B set to seeded values as training would leave them (built once, reused).

Contenders, each a child process sampled by algebra.memwatch (wall time, CPU, peak
RssAnon and VmHWM), inputs in page cache, alternating which goes first:
  alg   python -m algebra run lora.alg --force:  save(lora(load("a"), "adapter"), "out-alg")
  peft  load the base in bf16 (transformers, low_cpu_mem_usage), PeftModel.from_pretrained,
        merge_and_unload(), save_pretrained("out-peft")
Afterwards the two outputs are compared tensor by tensor (peft adds its float32 product
into the bf16 weight with one rounding, as alg does: they should be equal).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_MERGE = r"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, low_cpu_mem_usage=True)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""


def make_adapter(base: Path, out: Path, rank: int) -> None:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, low_cpu_mem_usage=True)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                    task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/alg-bench-1b"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import torch
    from bench_lerp import warm
    from safetensors import safe_open

    from algebra import memwatch

    work = args.dir
    base = work / "a"
    if not (base / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "bench_lerp.py"), "--dir", str(work), "--repeat", "0"], check=True)
    adapter = work / f"lora-r{args.rank}"
    if not (adapter / "adapter_model.safetensors").is_file():
        make_adapter(base, adapter, args.rank)
    recipe = work / "lora.alg"
    recipe.write_text(f'save(lora(load("a"), "{adapter.name}"), "out-alg")\n')
    (work / "peft_merge.py").write_text(PEFT_MERGE)
    cmds = {
        "alg": [sys.executable, "-m", "algebra", "run", str(recipe), "--force"],
        "peft": [sys.executable, str(work / "peft_merge.py"), str(base), str(adapter), str(work / "out-peft")],
    }
    inputs = sorted(base.glob("*.safetensors")) + [adapter / "adapter_model.safetensors"]
    runs: dict[str, list] = {k: [] for k in cmds}
    for i in range(args.repeat):
        for name in (list(cmds) if i % 2 == 0 else list(cmds)[::-1]):
            warm(inputs)
            with open(work / f"log-lora-{name}.txt", "w") as log:
                u = memwatch.run(cmds[name], 0.005, log=log, cwd=work)
            if u.returncode != 0:
                sys.exit(f"{name} failed: see {work / f'log-lora-{name}.txt'}")
            runs[name].append(u)
    print(f"1.1B bf16 base, rank-{args.rank} adapter on {len(TARGETS)} projections x 22 layers, "
          f"{args.repeat} run(s) each\n")
    print("| contender | wall median (s) | CPU median (s) | peak RssAnon (MB) | peak VmHWM (MB) |")
    print("|---|--:|--:|--:|--:|")
    for name, us in runs.items():
        print(f"| {name} | {statistics.median(u.wall_s for u in us):.2f} | {statistics.median(u.cpu_s for u in us):.2f} "
              f"| {max(u.peak_anon for u in us) / 1e6:.0f} | {max(u.hwm for u in us) / 1e6:.0f} |")

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as sf:
                out.update({k: sf.get_tensor(k) for k in sf.keys()})
        return out

    ours, theirs = tensors(work / "out-alg"), tensors(work / "out-peft")
    same = sum(torch.equal(ours[k], theirs[k]) for k in ours if k in theirs)
    print(f"\ntensors: alg {len(ours)}, peft {len(theirs)}; bit-identical: {same}")
    (work / "results-lora.json").write_text(json.dumps(
        {k: [vars(u) | {"stdout": None, "stderr": None} for u in us] for k, us in runs.items()}, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
