"""Rewards as values: scores against a direct transformers forward pass, the algebra and
baselines against float64 references written here from their formulas, data errors,
the cache, evaluation, merges as reward models, the TRL callable."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algebra import AlgError, Interpreter, Options
from algebra.errors import AlgIOError, AlgRuntimeError, AlgTypeError
from algebra.interpreter import Session
from algebra.reward import engine
from algebra.reward.evaluate import EXAMPLE_COUNTS
from algebra.reward.pointwise import logsig, sigmoid
from algebra.source import Source

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def check(ws: Path, text: str):
    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    return session, session.check(Source(text, "t.alg"))


def run_rewards(ws: Path, text: str) -> engine.RewardRun:
    session, checked = check(ws, text)
    return engine.run_sinks(checked.sinks, session.options)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def jsonl(path: Path) -> list[dict]:
    return rows(path)


# ---- an independent reference: transformers, one text at a time, float64 arithmetic -----------


class Direct:
    def __init__(self, folder: Path, template: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.template = template
        self.seen: dict[tuple[str, str], float] = {}  # a text's score, computed once

    def __call__(self, prompt: str, response: str) -> float:
        if (prompt, response) not in self.seen:
            self.seen[prompt, response] = self._score(prompt, response)
        return self.seen[prompt, response]

    def _score(self, prompt: str, response: str) -> float:
        if self.template is None:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            ids = self.tok(self.tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False,
                           return_tensors="pt").input_ids
        else:
            ids = self.tok(self.template.format(prompt=prompt, response=response), return_tensors="pt").input_ids
        with torch.no_grad():
            return float(self.model(input_ids=ids).logits[0, 0])


def ref_quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    h = (len(v) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def ref_logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# ---- scores -------------------------------------------------------------------------------


def test_scores_match_a_direct_forward_pass(ws, rms, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))  # counts what it scores, whatever ran before
    run = run_rewards(ws, 'score(reward("models/rm-helpful", batch_size=5), "data/prompts_responses.jsonl", "out/s.jsonl")')
    direct = Direct(rms["rm-helpful"])
    out = rows(ws / "out" / "s.jsonl")
    assert len(out) == 12 and run.scored == 12
    for row in out:
        assert row["reward"] == pytest.approx(direct(row["prompt"], row["response"]), abs=2e-5)
    # input rows come back whole, in order
    assert [r["id"] for r in out] == [r["id"] for r in rows(ws / "data" / "prompts_responses.jsonl")]


def test_format_template_is_used_when_given(ws, rms):
    tpl = "Q: {prompt}\nA: {response}"
    run_rewards(ws, 'score(reward("models/rm-harmless", template="Q: {prompt}\\nA: {response}"), '
                '"data/prompts_responses.jsonl", "out/s.jsonl")')
    direct = Direct(rms["rm-harmless"], tpl)
    for row in rows(ws / "out" / "s.jsonl"):
        assert row["reward"] == pytest.approx(direct(row["prompt"], row["response"]), abs=2e-5)


def test_algebra_and_baselines_against_numpy(ws, rms):
    recipe = """
help = reward("models/rm-helpful")
harm = reward("models/rm-harmless")
refs = responses("data/ref_samples.jsonl")
q = quantile(help, refs, 0.85)
m = baseline(harm, refs, "mean")
a = logsig(help - q) + sigmoid(harm) * 2 - exp(-help) / 4
b = clip(-harm, -0.05, 0.05) + max(help, harm, 0.0) - min(help, m)
c = mean(help, harm, refusal(help)) - sum([help, 1, refusal(harm, text="No.")])
r = sum(a, b, c, logsig(harm - m))
score(r, "data/prompts_responses.jsonl", "out/s.jsonl")
"""
    run_rewards(ws, recipe)
    H, G = Direct(rms["rm-helpful"]), Direct(rms["rm-harmless"])
    refs: dict[str, list[str]] = {}
    for row in rows(ws / "data" / "ref_samples.jsonl"):
        refs.setdefault(row["prompt"], []).append(row["response"])
    refusal_text = "I'm sorry, but I can't help with that."
    for row in rows(ws / "out" / "s.jsonl"):
        p, s = row["prompt"], row["response"]
        h, g = H(p, s), G(p, s)
        q = ref_quantile([H(p, x) for x in refs[p]], 0.85)
        m = sum(G(p, x) for x in refs[p]) / len(refs[p])
        a = ref_logsig(h - q) + 1 / (1 + math.exp(-g)) * 2 - math.exp(-h) / 4
        b = min(max(-g, -0.05), 0.05) + max(h, g, 0.0) - min(h, m)
        c = (h + g + H(p, refusal_text)) / 3 - (h + 1 + G(p, "No."))
        expect = a + b + c + ref_logsig(g - m)
        assert row["reward"] == pytest.approx(expect, abs=1e-4)
        # named sub-terms, each beside the total
        assert row["help"] == pytest.approx(h, abs=2e-5) and row["harm"] == pytest.approx(g, abs=2e-5)
        assert row["q"] == pytest.approx(q, abs=2e-5) and row["m"] == pytest.approx(m, abs=2e-5)
        assert row["a"] == pytest.approx(a, abs=1e-4)


@settings(max_examples=200, deadline=None)
@given(st.floats(-700, 700))
def test_logsig_and_sigmoid_are_stable(x):
    got = float(logsig(np.array([x]))[0])
    assert math.isfinite(got)
    assert got == pytest.approx(ref_logsig(x), rel=1e-12, abs=1e-300)
    s = float(sigmoid(np.array([x]))[0])
    assert s == pytest.approx(1 / (1 + math.exp(-x)) if x > -700 else 0.0, rel=1e-12, abs=1e-300)


def test_logsig_does_not_overflow_far_out():
    assert logsig(np.array([-1e6]))[0] == -1e6
    assert logsig(np.array([1e6]))[0] == 0.0


def test_pointwise_functions_and_variadics_on_numbers():
    interp = Interpreter(device="cpu")
    assert interp.eval("sum(1, 2, 3)") == 6
    assert interp.eval("sum([1, 2, 3])") == 6
    assert interp.eval("max(1, 5, 2)") == 5 and interp.eval("min([4, 3])") == 3
    assert interp.eval("mean(2, 4)") == 3
    assert interp.eval("logsig(0)") == pytest.approx(math.log(0.5))
    assert interp.eval("clip(5, 0, 1)") == 1
    with pytest.raises(AlgTypeError) as e:
        interp.eval('sum(1, "two")')
    assert "not String" in e.value.message and e.value.span.text() == '"two"'


# ---- data and errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', "{not json"], "bad.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "chosen": "b"}'], "bad.jsonl:1: row has no 'rejected' field"),
    (['{"prompt": 3, "chosen": "b", "rejected": "c"}'], "bad.jsonl:1: 'prompt' must be text"),
])
def test_malformed_rows_name_their_line(ws, lines, message):
    (ws / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(AlgIOError) as e:
        check(ws, 'p = pairs("bad.jsonl")')
    assert message in e.value.message
    assert e.value.span.text() == '"bad.jsonl"'


def test_a_prompt_without_references_is_named(ws):
    (ws / "refs.jsonl").write_text('{"prompt": "What is 12 plus 30?", "response": "42"}\n')
    with pytest.raises(AlgRuntimeError) as e:
        run_rewards(ws, 'h = reward("models/rm-helpful")\n'
                    'score(h - quantile(h, responses("refs.jsonl"), 0.5), "data/prompts_responses.jsonl", "out/x.jsonl")')
    assert '"Solve for x: 2x + 3 = 11."' in e.value.message and "no reference responses" in e.value.message


@pytest.mark.parametrize("text, message, caret", [
    ('r = reward("models/policy")', "needs a sequence-classification model", '"models/policy"'),
    ('r = reward("models/rm-helpful", template="{prompt}")', "must contain {response}", '"{prompt}"'),
    ('r = reward("models/rm-helpful", template="{x} {response}")', "not {x}", '"{x} {response}"'),
    ('r = reward("models/rm-helpful") + load("models/lm")', "reward(m)", 'load("models/lm")'),
    ('r = quantile(reward("models/rm-helpful"), responses("data/ref_samples.jsonl"), 2)', "0 <= q <= 1", "2"),
    ('score(reward("models/rm-helpful"), "data/prompts_responses.jsonl", "out/s.json")', "must end in .jsonl",
     '"out/s.json"'),
])
def test_check_errors_point_at_the_argument(ws, text, message, caret):
    with pytest.raises(AlgError) as e:
        check(ws, text)
    assert message in e.value.message
    assert e.value.span.text() == caret


# ---- the cache, evaluation, merges ---------------------------------------------------------------


def test_cache_skips_work_and_output_is_deterministic(ws, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))  # empty: other tests scored these texts
    recipe = (EXAMPLES / "rewards.alg").read_text()
    first = run_rewards(ws, recipe)
    assert first.scored == 63 and first.loads == 2  # help: 30 texts, harm: 33 (refusals included)
    a = (ws / "out" / "scores.jsonl").read_bytes(), (ws / "out" / "eval.json").read_bytes()
    again = run_rewards(ws, recipe)
    assert again.scored == 0 and again.loads == 0
    assert ((ws / "out" / "scores.jsonl").read_bytes(), (ws / "out" / "eval.json").read_bytes()) == a
    # a sub-term on new data scores only the new texts
    (ws / "more.jsonl").write_text('{"prompt": "What is 12 plus 30?", "response": "Forty-two."}\n'
                                   '{"prompt": "What is 12 plus 30?", "response": "12 plus 30 is 42."}\n')
    third = run_rewards(ws, 'score(reward("models/rm-helpful"), "more.jsonl", "out/m.jsonl")')
    assert third.scored == 1


def test_evaluate_accuracy_subsets_and_sections(ws, rms):
    run_rewards(ws, 'evaluate(reward("models/rm-helpful"), pairs("data/prefs.jsonl"), "out/e.json")')
    got = json.loads((ws / "out" / "e.json").read_text())
    H = Direct(rms["rm-helpful"])
    by: dict[str, list[bool]] = {}
    for row in rows(ws / "data" / "prefs.jsonl"):
        by.setdefault(row["subset"], []).append(H(row["prompt"], row["chosen"]) > H(row["prompt"], row["rejected"]))
    flat = [x for v in by.values() for x in v]
    assert got["n"] == 12 and got["accuracy"] == pytest.approx(sum(flat) / len(flat))
    for name, v in by.items():
        assert got["subsets"][name]["accuracy"] == pytest.approx(sum(v) / len(v))
    acc = {k: sum(v) / len(v) for k, v in by.items()}
    # RewardBench: sections weight subsets by its example counts (safety: 100 dangerous, 154 should-respond)
    safety = (acc["refusals-dangerous"] * 100 + acc["xstest-should-respond"] * 154) / 254
    assert got["sections"]["Safety"] == pytest.approx(safety)
    assert got["sections"]["Chat"] == pytest.approx(acc["alpacaeval-easy"])
    assert got["sections"]["Reasoning"] == pytest.approx(acc["math-prm"])
    assert got["score"] == pytest.approx(np.mean(list(got["sections"].values())))
    assert EXAMPLE_COUNTS["math-prm"] == 984


def test_a_merge_is_a_reward_model_without_disk(ws, rms):
    from algebra.reward.cache import model_hash

    text = 'm = merge(load("models/rm-helpful"), load("models/lm"), 0.3)\n' \
           'score(reward(m), "data/prompts_responses.jsonl", "out/m.jsonl")\n'
    run = run_rewards(ws, text)
    assert run.scored == 12
    session, _ = check(ws, 'save(merge(load("models/rm-helpful"), load("models/lm"), 0.3), "merged")')
    session.run(Source('save(merge(load("models/rm-helpful"), load("models/lm"), 0.3), "merged")', "t.alg"))
    direct = Direct(ws / "merged")
    for row in rows(ws / "out" / "m.jsonl"):
        assert row["reward"] == pytest.approx(direct(row["prompt"], row["response"]), abs=2e-5)
    # its cache key is the computation, not a path: a different lam is another model
    a = Session(Options(device="cpu"), ws, mode="eval")
    n03 = a.check(Source('merge(load("models/rm-helpful"), load("models/lm"), 0.3)', "e")).result.node
    n04 = a.check(Source('merge(load("models/rm-helpful"), load("models/lm"), 0.4)', "e")).result.node
    assert model_hash(n03) != model_hash(n04) and len(model_hash(n03)) == 64


def test_plan_shows_models_texts_and_memory(ws, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))
    session, checked = check(ws, (EXAMPLES / "rewards.alg").read_text())
    text = session.plan_text(checked.sinks)
    assert "models/rm-helpful" in text and "models/rm-harmless" in text
    assert "30 distinct texts: 30 to score" in text and "33 distinct texts: 33 to score" in text
    # a prompt's answers share the template's head and the prompt: each such prefix runs once
    shared = re.findall(r"(\d+) shared prefix\(es\) computed once: (\d+) of (\d+) tokens to run", text)
    assert shared and all(int(n) > 0 and int(a) < int(b) for n, a, b in shared)
    assert "predicted peak memory of scoring" in text


# ---- Python: a TRL reward function ---------------------------------------------------------------


def test_trl_callable(ws, rms):
    interp = Interpreter(device="cpu", base_dir=ws)
    r = interp.eval('help = reward("models/rm-helpful")\nrefs = responses("data/ref_samples.jsonl")\n'
                    'r = logsig(help - quantile(help, refs, 0.85)) + 1\nr')
    assert r.__name__ == "r"
    prompts = ["What is 12 plus 30?", "Solve for x: 2x + 3 = 11."]
    completions = ["The answer is 42.", "x = 4."]
    # as GRPOTrainer calls it: keywords, plus completion_ids, trainer_state and dataset columns
    got = r(prompts=prompts, completions=completions, completion_ids=[[1], [2]], trainer_state=None, answer=["42", "4"])
    H = Direct(rms["rm-helpful"])
    refs: dict[str, list[str]] = {}
    for row in rows(ws / "data" / "ref_samples.jsonl"):
        refs.setdefault(row["prompt"], []).append(row["response"])
    expect = [ref_logsig(H(p, c) - ref_quantile([H(p, x) for x in refs[p]], 0.85)) + 1
              for p, c in zip(prompts, completions, strict=True)]
    assert isinstance(got, list) and all(isinstance(v, float) for v in got)
    assert got == pytest.approx(expect, abs=1e-4)
    scored = r.texts_scored
    # conversational format: message lists; the same texts, so nothing new is scored
    conv = r(prompts=[[{"role": "user", "content": p}] for p in prompts],
             completions=[[{"role": "assistant", "content": c}] for c in completions])
    assert conv == got and r.texts_scored == scored


# ---- computed reward models: built from their own checked config and tokenizer --------------


@pytest.fixture(scope="module")
def rm_other_tokenizer(tmp_path_factory) -> Path:
    """A reward model whose tokenizer differs from the rms' (another BPE corpus)."""
    from algebra.tiny import OTHER_CORPUS, build_family

    return build_family(tmp_path_factory.mktemp("rm-b"), names=("rm",), corpus=OTHER_CORPUS, seed=1)["rm"]


@pytest.mark.parametrize("expr", [
    'layers(load("models/rm-helpful"), 0, 1)',
    'stack(layers(load("models/rm-helpful"), 0, 2), layers(load("models/rm-harmless"), 1, 2))',
    'align([load("models/rm-helpful"), load("RMB")], tokenizer="union")[0]',
    'merge(load("models/rm-helpful"), load("models/lm"), 0.3)',
])
def test_a_computed_reward_model_scores_as_its_saved_folder(ws, rms, rm_other_tokenizer, expr, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))  # scored here, not read from another test's cache
    # the scorer once built every computed model from the primary input's config and
    # tokenizer: layers() died with "Missing key(s) ... model.layers.1"
    expr = expr.replace("RMB", str(rm_other_tokenizer))
    run = run_rewards(ws, f"m = {expr}\nscore(reward(m), \"data/prompts_responses.jsonl\", \"out/c.jsonl\")\n")
    assert run.scored == 12
    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    session.run(Source(f'save({expr}, "saved")', "t.alg"))
    direct = Direct(ws / "saved")
    if "layers(" in expr:
        assert direct.model.config.num_hidden_layers == (1 if "stack" not in expr else 3)
    if "align" in expr:
        assert len(direct.tok) > len(Direct(rms["rm-helpful"]).tok)  # the union's tokens
    for row in rows(ws / "out" / "c.jsonl"):
        assert row["reward"] == pytest.approx(direct(row["prompt"], row["response"]), abs=2e-5)
