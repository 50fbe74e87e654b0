"""`alg demo`: the main job on an embedded default, end to end.

1. builds small checkpoints of a real architecture (Llama, random weights) with a real
   tokenizer trained here: an SFT model, a math fine-tune, a reward model on the same base
   and two RL policies (see `algebra.tiny`);
2. copies the example recipes beside them and runs each exactly as `alg run` would:
   examples/dogerm.alg and examples/warp.alg (weights), examples/rewards.alg (rewards
   combined, scored and evaluated) and examples/dogerm_sweep.alg (accuracy against lam,
   table and PNG), with their data (examples/data);
3. loads every folder written with transformers, runs a forward pass, and says what was
   written: the merged reward model's score for a prompt beside the original's.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from .errors import AlgError
from .interpreter import Session
from .io.files import read_source
from .options import Options
from .resources import examples_dir
from .types import human_bytes

RECIPES = ("dogerm.alg", "warp.alg", "rewards.alg", "dogerm_sweep.alg")
MODELS = ("sft", "math", "rm", "rl1", "rl2")
REWARD_MODELS = ("rm-helpful", "rm-harmless", "policy", "lm")


def run_demo(folder: Path, options: Options) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = folder.resolve()
    models = folder / "models"
    say = options.out
    if not all((models / m / "config.json").is_file() for m in MODELS):
        say(f"building demo checkpoints in {models} (Llama, random weights, BPE tokenizer) ...")
        from .tiny import build_family

        t0 = time.perf_counter()
        build_family(models, hidden=128, layers=4, names=MODELS)
        say(f"  built {', '.join(MODELS)} in {time.perf_counter() - t0:.1f}s")
    else:
        say(f"using demo checkpoints in {models}")
    if not all((models / m / "config.json").is_file() for m in REWARD_MODELS):
        say("building two reward models, a policy and an LM on one base (Llama) ...")
        from .tiny import build_reward_models

        t0 = time.perf_counter()
        build_reward_models(models, hidden=128, layers=4)
        say(f"  built {', '.join(REWARD_MODELS)} in {time.perf_counter() - t0:.1f}s")
    data = folder / "data"
    data.mkdir(exist_ok=True)
    for f in sorted((examples_dir() / "data").glob("*.jsonl")):
        shutil.copyfile(f, data / f.name)
    options = replace(options, force=True)
    written: list[Path] = []
    for name in RECIPES:
        recipe = folder / name
        shutil.copyfile(examples_dir() / name, recipe)
        say(f"\n$ alg run {recipe.relative_to(Path.cwd()) if recipe.is_relative_to(Path.cwd()) else recipe}")
        session = Session(options, folder, mode="file")
        try:
            checked = session.check(read_source(recipe))
            session.run_sinks(checked.sinks)
        except AlgError as e:
            print(e.format())
            return 1
        written += [s.value.path for s in checked.sinks if s.kind == "save"]
    say("\nchecking every output with transformers:")
    for path in written:
        say("  " + _verify(path, models))
    return 0


def _verify(path: Path, models: Path) -> str:
    """Load a written folder with transformers and run it on a prompt."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    arch = config["architectures"][0]
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    text = "What is 12 plus 30? The answer is 42."
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        if arch.endswith("ForSequenceClassification"):
            model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False)
            base = AutoModelForSequenceClassification.from_pretrained(models / "rm", trust_remote_code=False)
            score = float(model(**ids).logits[0, 0])
            before = float(base(**ids).logits[0, 0])
            what = f"reward {score:+.4f} (the unmerged rm gives {before:+.4f})"
        else:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
            init = AutoModelForCausalLM.from_pretrained(models / "sft", trust_remote_code=False).state_dict()
            moved = max(float((t - init[n]).abs().max()) for n, t in model.state_dict().items())
            loss = float(model(**ids, labels=ids["input_ids"]).loss)
            what = f"loss {loss:.4f} on a sample sentence; weights moved up to {moved:.2e} from sft"
    return f"{path.name}: {arch}, {human_bytes(size)}, loads in transformers; {what}"
