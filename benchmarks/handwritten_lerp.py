"""The baseline for bench_lerp.py: the plain safetensors loop a user would write by hand.

    python benchmarks/handwritten_lerp.py A B OUT [--t 0.3]

For each shard of A (a Hugging Face folder with model.safetensors.index.json, or a single
model.safetensors): open the shard and B's matching file with `safetensors.safe_open`,
compute `torch.lerp(a.float(), b.float(), t).to(a.dtype)` tensor by tensor into a dict,
write the dict with `safetensors.torch.save_file`, then write the index and copy
config.json. No special memory tricks: one output shard is held in memory at a time,
which is what the obvious loop does.
"""

from __future__ import annotations

import argparse
import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


def weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--t", type=float, default=0.3)
    args = ap.parse_args()

    map_a, map_b = weight_map(args.a), weight_map(args.b)
    if set(map_a) != set(map_b):
        raise SystemExit("the two checkpoints do not hold the same tensor names")
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for shard in sorted(set(map_a.values())):
        names = [n for n, s in map_a.items() if s == shard]
        result: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            fa = stack.enter_context(safe_open(args.a / shard, framework="pt"))
            fb: dict[str, object] = {}  # B's files, opened as needed (usually just one)
            for name in names:
                if map_b[name] not in fb:
                    fb[map_b[name]] = stack.enter_context(
                        safe_open(args.b / map_b[name], framework="pt"))
                a = fa.get_tensor(name)
                b = fb[map_b[name]].get_tensor(name)
                result[name] = torch.lerp(a.float(), b.float(), args.t).to(a.dtype)
                total += result[name].numel() * result[name].element_size()
                del a, b
        save_file(result, args.out / shard, metadata={"format": "pt"})
        del result
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(map_a.items()))}
    (args.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if (args.a / "config.json").is_file():
        shutil.copy2(args.a / "config.json", args.out / "config.json")


if __name__ == "__main__":
    main()
