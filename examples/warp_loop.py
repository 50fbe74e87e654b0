"""WARP end to end (Ramé et al., 2024): M RL runs, each against its own EMA anchor, their
SLERP per layer, LITI back toward the init, I times; then the KL-reward front.

    pip install '.[trl]'
    python examples/warp_loop.py                    # SmolLM2-135M-Instruct (the real tier), M=2, I=2
    python examples/warp_loop.py --sft DIR --rm DIR --out runs/warp --m 2 --iterations 2 --steps 4

alg does every weight step: the EMA anchor's update after each optimiser step
(`ema([anchor, policy], mu)`, through the embedded interpreter, in memory), the SLERP of
the task vectors, the LITI, and the front. TRL's GRPOTrainer does only the optimiser step,
with the anchor as its KL reference (beta > 0) and alg's reward model as its reward.

Without --sft/--rm the script builds (once, cached) the real-model fixtures of
tests/real/build.py: SmolLM2-135M-Instruct in bf16 and a reward model with a trained
score head on the same base. Outputs, under --out:

    iter1/rl1 .. iter1/rlM   the RL policies of iteration 1 (Hugging Face folders)
    iter1/init               their WARP merge, the next iteration's init
    ...
    front.json, front.png    reward against KL(policy || SFT) for LITI's eta from 0 to 1,
                             from the last init toward the last SLERP
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "What is 12 plus 30?", "Give me a quick pasta recipe.", "Name three primary colours.",
    "How many legs does a spider have?", "What is the capital of France?", "Suggest a healthy breakfast.",
    "What is 7 times 8?", "How do I boil an egg?",
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", type=Path, help="the SFT init (a causal LM folder); default: SmolLM2 from the real tier")
    p.add_argument("--rm", type=Path, help="the reward model (a sequence-classification folder)")
    p.add_argument("--out", type=Path, default=Path("runs/warp"))
    p.add_argument("--m", type=int, default=2, help="RL runs per iteration (M)")
    p.add_argument("--iterations", type=int, default=2, help="WARP iterations (I)")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per RL run")
    p.add_argument("--mu", type=float, default=0.01, help="EMA anchor rate")
    p.add_argument("--eta", type=float, default=0.3, help="LITI's eta between iterations")
    p.add_argument("--beta", type=float, default=0.1, help="KL coefficient to the anchor")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--completion-length", type=int, default=16)
    p.add_argument("--front", type=str, default="0,0.25,0.5,0.75,1", help="LITI etas of the front")
    p.add_argument("--front-samples", type=int, default=4, help="samples per prompt for each point's KL and reward")
    return p.parse_args(argv)


def anchor_ema(interp: Any, mu: float) -> Any:
    """A TRL callback: after each optimiser step, alg updates the anchor (the trainer's
    reference model) to ema([anchor, policy], mu) = (1 - mu) anchor + mu policy, in memory."""
    from transformers import TrainerCallback

    class AnchorEMA(TrainerCallback):
        def __init__(self) -> None:
            self.trainer: Any = None
            self.updates = 0

        def on_step_end(self, args, state, control, **kw):
            t = self.trainer
            new = interp.eval("ema([anchor, policy], mu)", anchor=t.ref_model, policy=t.model, mu=mu).state_dict()
            t.ref_model.load_state_dict(new)
            self.updates += 1

    return AnchorEMA()


def rl_run(init: Path, reward_fn: Any, out: Path, seed: int, a: argparse.Namespace, interp: Any) -> dict:
    """One RL run from `init` (GRPO, the anchor as KL reference); the policy saved to `out`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(init)
    policy = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    ema = anchor_ema(interp, a.mu)
    args = GRPOConfig(output_dir=str(out.parent / f".trl-{out.name}"), report_to=[], use_cpu=True,
                      max_steps=a.steps, logging_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=a.completion_length, learning_rate=a.lr, beta=a.beta,
                      save_strategy="no", seed=seed, bf16=False, disable_tqdm=True)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward_fn], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[ema])
    ema.trainer = trainer
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    trainer.model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return {"policy": str(out), "anchor_updates": ema.updates, "rewards": rewards}


def real_fixtures() -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "real"))
    import build  # tests/real/build.py: builds once, then reads its cache

    paths = build.ensure()
    return paths["base"], paths["rm"]


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    from algebra import Interpreter

    sft, rm = (a.sft, a.rm) if a.sft else real_fixtures()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    interp = Interpreter(device="cpu", base_dir=out, out=lambda _: None)
    reward_fn = interp.eval(f'r = reward("{Path(rm).resolve()}")')
    summary: dict[str, Any] = {"sft": str(sft), "rm": str(rm), "iterations": []}
    init = Path(sft).resolve()
    t0 = time.perf_counter()
    for i in range(1, a.iterations + 1):
        runs = [rl_run(init, reward_fn, out / f"iter{i}" / f"rl{j}", seed=100 * i + j, a=a, interp=interp)
                for j in range(1, a.m + 1)]
        nxt = out / f"iter{i}" / "init"
        policies = ", ".join(f'load("{r["policy"]}")' for r in runs)
        interp.eval(f'use warp\nsave(warp(load("{init}"), [{policies}], {a.eta}), "{nxt}", overwrite=true)')
        summary["iterations"].append({"init": str(init), "runs": runs, "next_init": str(nxt)})
        print(f"iteration {i}: {a.m} runs of {a.steps} steps, merged into {nxt} "
              f"({time.perf_counter() - t0:.0f}s so far)", flush=True)
        last_init, last_runs, init = init, runs, nxt
    etas = [float(e) for e in a.front.split(",")]
    policies = ", ".join(f'load("{r["policy"]}")' for r in last_runs)
    prompts = json.dumps(PROMPTS[:4])
    front = Interpreter(device="cpu", base_dir=out)  # prints the front's table
    front.eval(f'merged = slerp([{policies}], base=load("{last_init}"), per="layer")\n'
               f'front([liti(load("{last_init}"), merged, e) for e in {etas}], load("{Path(sft).resolve()}"), '
               f'reward("{Path(rm).resolve()}"), {prompts}, "{out / "front.json"}", x={etas}, xlabel="eta", '
               f'plot="{out / "front.png"}", n={a.front_samples}, max_new_tokens={a.completion_length}, '
               'overwrite=true)')
    summary["front"] = json.loads((out / "front.json").read_text())
    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'front.json'}, {out / 'front.png'} and {out / 'summary.json'} "
          f"in {summary['seconds']:.0f}s", flush=True)
    return summary


if __name__ == "__main__":
    main()
