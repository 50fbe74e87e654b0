"""Transforming and combining rewards (Wang et al., 2024) on the real-model tier.

    python examples/papers/transform/run.py [--n 2] [--n-refs 2] [--tokens 16] [--out DIR]

1. finds (or builds) SmolLM2-135M-Instruct's fixtures (tests/real/build.py) and the
   brevity reward model (brevity_rm.py);
2. `alg run samples.alg`: n base-policy candidates per prompt, n_refs other base samples
   as the LSC references, one more base sample per prompt as the opponent, all scored;
3. best-of-n here, per prompt: the candidate maximising the raw sum help + brev, the one
   maximising the LSC sum (alg's `reward` column), and the first candidate (no selection,
   a control that should win about half the time);
4. `alg run winrate.alg`: each selection's win rate against the base sample, judged by
   help and by brev (alg's `winrate`); the AND judge (both better) is computed here from
   the same scores, with Wilson's interval from algebra.reward.policy_eval (alg's winrate
   takes one reward). Writes summary.json and winrate.png to the output folder.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import brevity_rm  # noqa: E402  (also puts tests/real on sys.path)
import build  # noqa: E402

SELECTIONS = ("raw", "lsc", "first")
JUDGES = ("help", "brev")


def alg(verb: str, recipe: str, sets: dict[str, object], extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "algebra", verb, str(HERE / recipe)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    t = time.perf_counter()
    rc = subprocess.call([*cmd, *extra], cwd=HERE)  # alg from the environment (PYTHONPATH or installed)
    print(f"alg {verb} {recipe}: exit {rc}, {time.perf_counter() - t:.1f}s wall", file=sys.stderr)
    if rc:
        sys.exit(rc)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def select(cands: list[dict]) -> dict[str, list[dict]]:
    """Best-of-n per prompt (prompts in first-seen order; a tie goes to the earlier sample)."""
    by_prompt: dict[str, list[dict]] = {}
    for row in cands:
        by_prompt.setdefault(row["prompt"], []).append(row)
    keys = {"raw": lambda r: r["help"] + r["brev"], "lsc": lambda r: r["reward"]}
    out: dict[str, list[dict]] = {s: [] for s in SELECTIONS}
    for rows in by_prompt.values():
        for s, key in keys.items():
            best = max(range(len(rows)), key=lambda i: (key(rows[i]), -i))
            out[s].append(rows[best])
        out["first"].append(rows[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2, help="candidates per prompt")
    ap.add_argument("--n-refs", type=int, default=2, help="reference samples per prompt")
    ap.add_argument("--tokens", type=int, default=16, help="max_new_tokens")
    ap.add_argument("--prompts", default=str(HERE / "prompts.jsonl"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--check", action="store_true", help="only `alg check` both recipes (step 2 and 4)")
    ap.add_argument("rest", nargs="*", help="after --: more options for alg run")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    f = build.ensure()
    models = {"base_dir": f["base"], "help_dir": f["rm"], "brev_dir": brevity_rm.ensure()}
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {**models, "prompts": Path(a.prompts).resolve(), "tokens": a.tokens}
    sel_files = {s: out / f"select_{s}.jsonl" for s in SELECTIONS}
    wr_files = {(s, j): out / f"winrate_{s}_{j}.json" for s in SELECTIONS for j in JUDGES}
    step2 = {**common, "n": a.n, "n_refs": a.n_refs,
             "cands_out": out / "candidates.jsonl", "base_out": out / "base_sample.jsonl"}
    step4 = {**common, **{f"{s}_sel": p for s, p in sel_files.items()},
             **{f"wr_{s}_{j}": p for (s, j), p in wr_files.items()}}
    if a.check:
        alg("check", "samples.alg", step2, ["--force"])
        for p in sel_files.values():  # winrate.alg reads them: any well-formed rows will do
            if not p.exists():
                write_jsonl(p, [{"prompt": "x", "response": "y"}])
        alg("check", "winrate.alg", step4, ["--force"])
        return 0

    alg("run", "samples.alg", step2, a.rest)
    cands = read_jsonl(out / "candidates.jsonl")
    base = {r["prompt"]: r for r in read_jsonl(out / "base_sample.jsonl")}
    chosen = select(cands)
    for s, rows in chosen.items():
        write_jsonl(sel_files[s], [{"prompt": r["prompt"], "response": r["response"]} for r in rows])
    alg("run", "winrate.alg", step4, a.rest)

    from algebra.reward.policy_eval import win_rate  # the same counting (ties half) and interval

    summary: dict = {"n": a.n, "n_refs": a.n_refs, "max_new_tokens": a.tokens, "prompts": len(base),
                     "selections": {}}
    for s, rows in chosen.items():
        entry: dict = {}
        for j in JUDGES:
            wr = json.loads(wr_files[(s, j)].read_text())
            mine = win_rate([r[j] for r in rows], [base[r["prompt"]][j] for r in rows])
            # alg's winrate re-scored the selected texts: it must agree with the step-2 scores
            if not math.isclose(wr["winrate"], mine["winrate"], abs_tol=1e-9):
                raise SystemExit(f"winrate {s}/{j}: alg says {wr['winrate']}, the scores say {mine['winrate']}")
            entry[j] = wr
        both = [1.0 if all(r[j] > base[r["prompt"]][j] for j in JUDGES) else 0.0 for r in rows]
        entry["and"] = win_rate(both, [0.5] * len(both))  # a win only when both are strictly better
        entry["mean_help"] = sum(r["help"] for r in rows) / len(rows)
        entry["mean_brev"] = sum(r["brev"] for r in rows) / len(rows)
        entry["mean_words"] = sum(len(r["response"].split()) for r in rows) / len(rows)
        summary["selections"][s] = entry
    summary["base"] = {"mean_help": sum(r["help"] for r in base.values()) / len(base),
                       "mean_brev": sum(r["brev"] for r in base.values()) / len(base),
                       "mean_words": sum(len(r["response"].split()) for r in base.values()) / len(base)}
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\nbest-of-{a.n} vs a random base sample, {len(base)} prompts (win rate [95% Wilson])")
    print(f"{'selection':10} " + " ".join(f"{j:>22}" for j in (*JUDGES, "and")))
    for s, e in summary["selections"].items():
        cells = [f"{e[j]['winrate']:.2f} [{e[j]['ci95'][0]:.2f}, {e[j]['ci95'][1]:.2f}]" for j in (*JUDGES, "and")]
        print(f"{s:10} " + " ".join(f"{c:>22}" for c in cells))
    plot(summary, out / "winrate.png")
    build.redact(out, HERE)  # the JSON written name the models and data without this machine's paths
    return 0


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    judges = (*JUDGES, "and")
    width = 0.8 / len(judges)
    for k, j in enumerate(judges):
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(SELECTIONS):
            e = summary["selections"][s][j]
            xs.append(i + (k - 1) * width)
            ys.append(e["winrate"])
            lo.append(max(0.0, e["winrate"] - e["ci95"][0]))  # Wilson at 0 or 1: rounding
            hi.append(max(0.0, e["ci95"][1] - e["winrate"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"judge: {j}")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(SELECTIONS)), ["BoN raw sum", "BoN LSC sum", "first sample"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs base sample")
    ax.set_title(f"best-of-{summary['n']}, {summary['prompts']} prompts, SmolLM2-135M")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
