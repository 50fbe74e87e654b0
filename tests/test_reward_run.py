"""Rewards end to end: the example recipes, generate (sampling, seeding, caching),
normalize against numpy, the DogeRM sweep with its PNG, and `alg score` as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_reward import EXAMPLES, Direct, check, rows, run_rewards

from algebra.reward.generate import Generated


def test_the_issue_example_runs_as_written(ws):
    recipe = (EXAMPLES / "rewards.alg").read_text()
    assert 'r = sum(logsig(help - quantile(help, refs, 0.85)), logsig(harm - refusal(harm)))' in recipe
    run_rewards(ws, recipe)
    out = rows(ws / "out" / "scores.jsonl")
    assert len(out) == 12 and all({"reward", "help", "harm"} <= set(r) for r in out)
    ev = json.loads((ws / "out" / "eval.json").read_text())
    assert set(ev["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"} and ev["n"] == 12


def test_generate_is_seeded_cached_and_usable_as_references(ws, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))
    text = ('pol = load("models/policy")\n'
            'g = generate(pol, "data/prompts_responses.jsonl", n=3, max_new_tokens=5, seed=1)\n'
            'h = reward("models/rm-helpful")\n'
            'score(h - quantile(h, g, 0.5), "data/prompts_responses.jsonl", "out/g.jsonl", overwrite=true)\n')
    first = run_rewards(ws, text)
    (g,) = [v for v in first.generated if isinstance(v, Generated)]
    samples = first.generated[g].by_prompt()
    assert len(samples) == 6 and all(len(v) == 3 for v in samples.values())
    assert first.loads == 2  # the policy, then the reward model
    again = run_rewards(ws, text)
    assert again.loads == 0 and again.scored == 0  # samples and scores both cached
    assert again.generated[next(iter(again.generated))].by_prompt() == samples
    # a prompt's samples depend on (seed, prompt) only, not on the other prompts asked for
    monkeypatch.setenv("ALG_CACHE", str(ws / "cache2"))
    session, checked = check(ws, 'g = generate(load("models/policy"), ["What is 12 plus 30?"], n=3, '
                             'max_new_tokens=5, seed=1)\nscore(reward("models/rm-helpful") - '
                             'quantile(reward("models/rm-helpful"), g, 0.5), responses("data/prompts_responses.jsonl"), "out/y.jsonl")')
    from algebra.reward.engine import RewardRun

    run = RewardRun(session.options)
    g1 = checked.sinks[0].value.reward.args[1].refs
    run.resolve_generations([g1])
    assert run.generated[g1].by_prompt()["What is 12 plus 30?"] == samples["What is 12 plus 30?"]


def test_generate_needs_a_causal_lm(ws):
    from algebra.errors import AlgTypeError

    with pytest.raises(AlgTypeError) as e:
        check(ws, 'g = generate(load("models/rm-helpful"), ["hi"])')
    assert "causal LM" in e.value.message and e.value.span.text() == 'load("models/rm-helpful")'


def test_normalize_is_a_z_score_over_its_data(ws, rms):
    run_rewards(ws, 'h = reward("models/rm-harmless")\n'
                'score(normalize(h, "data/ref_samples.jsonl"), "data/prompts_responses.jsonl", "out/n.jsonl")')
    G = Direct(rms["rm-harmless"])
    ref = np.array([G(r["prompt"], r["response"]) for r in rows(ws / "data" / "ref_samples.jsonl")])
    mu, sd = ref.mean(), ref.std()
    for row in rows(ws / "out" / "n.jsonl"):
        assert row["reward"] == pytest.approx((G(row["prompt"], row["response"]) - mu) / sd, abs=1e-3)
    # over its own data it has mean 0 and standard deviation 1
    run_rewards(ws, 'h = reward("models/rm-harmless")\n'
                'score(normalize(h, "data/ref_samples.jsonl"), "data/ref_samples.jsonl", "out/z.jsonl")')
    z = np.array([r["reward"] for r in rows(ws / "out" / "z.jsonl")])
    assert abs(z.mean()) < 1e-9 and z.std() == pytest.approx(1.0, abs=1e-9)


def test_dogerm_sweep_writes_table_and_png(ws, rms, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))
    recipe = (EXAMPLES / "dogerm_sweep.alg").read_text()
    printed: list[str] = []
    from algebra import Options
    from algebra.interpreter import Session
    from algebra.source import Source

    session = Session(Options(device="cpu", out=printed.append), ws, mode="file")
    checked = session.check(Source(recipe, "dogerm_sweep.alg"))
    from algebra.reward.engine import run_sinks

    run = run_sinks(checked.sinks, session.options)
    assert run.loads == 11  # one merged reward model per lam, each loaded once
    doc = json.loads((ws / "out" / "dogerm_sweep.json").read_text())
    assert [r["x"] for r in doc["results"]] == pytest.approx([i / 10 for i in range(11)])
    png = (ws / "out" / "dogerm_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert any(line.startswith("lam") for line in "\n".join(printed).splitlines())
    # lam = 0 is the reward model itself: its accuracy equals the unmerged model's
    H = Direct(rms["rm-helpful"])
    prefs = rows(ws / "data" / "prefs.jsonl")
    acc0 = np.mean([H(r["prompt"], r["chosen"]) > H(r["prompt"], r["rejected"]) for r in prefs])
    assert doc["results"][0]["accuracy"] == pytest.approx(acc0)
    again = run_sinks(session.check(Source(recipe, "dogerm_sweep.alg")).sinks, session.options)
    assert again.loads == 0 and (ws / "out" / "dogerm_sweep.png").read_bytes() == png


def test_alg_score_and_plan_on_the_command_line(ws, monkeypatch, capsys):
    (ws / "rewards.alg").write_text((EXAMPLES / "rewards.alg").read_text())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    args = ["score", "rewards.alg", "r", "--data", "data/prompts_responses.jsonl", "--out", "out/cli.jsonl",
            "--device", "cpu"]
    p = subprocess.run([sys.executable, "-m", "algebra", *args], cwd=ws, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    out = rows(ws / "out" / "cli.jsonl")
    assert len(out) == 12 and {"reward", "help", "harm"} <= set(out[0])
    assert not (ws / "out" / "eval.json").exists()  # the recipe's own sinks did not run

    # the rest in this process, to save start-ups
    from algebra.cli import main

    monkeypatch.chdir(ws)
    assert main(args[:2] + ["nope"] + args[3:]) == 1
    assert "no name 'nope'" in capsys.readouterr().err
    # an existing --out is refused unless --force, which replaces it
    (ws / "out" / "cli.jsonl").write_text("stale\n")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "'out/cli.jsonl' already exists; pass --force to alg score to replace it" in err, err
    assert (ws / "out" / "cli.jsonl").read_text() == "stale\n"
    assert main([*args, "--force"]) == 0, capsys.readouterr().err
    assert rows(ws / "out" / "cli.jsonl") == out
    assert main(["plan", "rewards.alg"]) == 0
    assert "scoring (reward models are loaded one at a time)" in capsys.readouterr().out


def test_alg_score_usage_and_help_name_force():
    from algebra.cli import build_parser

    score = next(a for a in build_parser()._actions if a.choices).choices["score"]
    assert "[--force]" in score.format_usage()
    assert "replace an existing --out file" in " ".join(score.format_help().split())


def test_generate_from_a_computed_policy_samples_as_its_saved_folder(ws, monkeypatch):
    # a computed policy is built from its own config (here 1 layer), not its primary's
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from algebra.interpreter import Session
    from algebra.options import Options
    from algebra.reward.generate import sample
    from algebra.source import Source

    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))
    expr = 'layers(load("models/policy"), 0, 1)'
    run = run_rewards(ws, f'g = generate({expr}, ["What is 12 plus 30?"], n=2, temperature=0, max_new_tokens=6)\n'
                      'score(reward("models/rm-helpful"), g, "out/g.jsonl")\n')
    (g,) = list(run.generated)
    got = run.generated[g].by_prompt()["What is 12 plus 30?"]
    Session(Options(device="cpu", out=lambda _: None), ws).run(Source(f'save({expr}, "saved")', "t.alg"))
    model = AutoModelForCausalLM.from_pretrained(ws / "saved").eval()
    assert model.config.num_hidden_layers == 1
    tok = AutoTokenizer.from_pretrained(ws / "saved")
    assert got == sample(model, tok, g.spec, "What is 12 plus 30?", "cpu")


def test_samples_are_cached_per_sampling_dtype(ws, monkeypatch):
    """A policy sampled in another dtype (bf16 on a GPU; float64 here, with --float64)
    draws other texts: it must not be served the float32 run's samples, nor they its."""
    from dataclasses import replace

    import torch

    from algebra.reward import engine
    from algebra.reward.generate import policy_key

    monkeypatch.setenv("ALG_CACHE", str(ws / "cache-dtype"))
    text = ('g = generate(load("models/policy"), "data/prompts_responses.jsonl", n=2, max_new_tokens=4, seed=3)\n'
            'score(reward("models/rm-helpful"), g, "out/d.jsonl", overwrite=true)\n')
    assert policy_key("h", torch.float32) == "h" and policy_key("h", torch.bfloat16) == "h:bfloat16"
    first = run_rewards(ws, text)
    assert first.loads == 2  # policy and reward model
    session, checked = check(ws, text)
    wide = engine.run_sinks(checked.sinks, replace(session.options, compute_dtype="float64"))
    assert wide.loads == 2  # sampled again in float64: the float32 samples were not reused
    again = run_rewards(ws, text)
    assert again.loads == 0  # each dtype's samples stay cached under their own key
