"""Policy-level evaluation: kl (against an exact enumeration), winrate (against a direct
forward pass and Wilson's published intervals), and front (WARP's KL-reward sweep)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_reward import Direct, check, run_rewards

from algebra.errors import AlgIOError, AlgTypeError
from algebra.reward import policy_eval as pe
from algebra.reward.builtins import KLRequest

PROMPT = "What is 12 plus 30?"


def _lm(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()


def _tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _next_logp(model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor(ids)).logits[:, -1].double(), dim=-1)


def exact_kl_two_tokens(policy, ref, tok, prompt) -> float:
    """KL(pi || ref) over every response of at most two tokens, by the chain rule:
    the first token's KL plus, for each first token that does not end the response, its
    probability times the second token's KL."""
    x = pe.prompt_ids(tok, prompt)
    stop = pe.eos_ids(policy, tok)
    lp, lr = _next_logp(policy, [x])[0], _next_logp(ref, [x])[0]
    total = float((lp.exp() * (lp - lr)).sum())
    firsts = [y for y in range(lp.shape[0]) if y not in stop]
    seqs = [x + [y] for y in firsts]
    lp2, lr2 = _next_logp(policy, seqs), _next_logp(ref, seqs)
    second = (lp2.exp() * (lp2 - lr2)).sum(dim=-1)
    total += float((lp[firsts].exp() * second).sum())
    return total


@pytest.fixture(scope="module")
def far(rms, tmp_path_factory):
    """A causal LM far enough from `policy` for a KL well above sampling noise: its weights
    perturbed by a third of their spread and its output head sharpened tenfold (a random
    tiny model is close to uniform), with the same tokenizer."""
    from algebra.tiny import perturb

    folder = tmp_path_factory.mktemp("far") / "far"
    m = _lm(rms["policy"]).float()
    state = perturb(m.state_dict(), 7, 0.3)
    state["lm_head.weight"] = state["lm_head.weight"] * 10
    m.load_state_dict(state)
    m.save_pretrained(folder)
    _tok(rms["policy"]).save_pretrained(folder)
    return folder


def test_kl_estimate_matches_an_exact_enumeration(ws, far):
    (ws / "models" / "far").symlink_to(far)
    recipe = (f'kl(load("models/far"), load("models/policy"), ["{PROMPT}"], n=1500, max_new_tokens=2, seed=3, '
              'out="out/kl.json")')
    run_rewards(ws, recipe)
    got = json.loads((ws / "out" / "kl.json").read_text())
    exact = exact_kl_two_tokens(_lm(far), _lm(ws / "models" / "policy"), _tok(far), PROMPT)
    assert exact > 0.05  # far from its base
    assert got["samples"] == 1500 and got["n"] == 1500 and got["prompts"] == 1
    assert 0 < got["kl_se"] < exact / 2
    assert abs(got["kl"] - exact) < 4 * got["kl_se"], (got, exact)


def test_each_sample_log_ratio_is_the_sum_of_its_token_log_ratios(rms):
    """The sampler's sequences and teacher-forced log-probabilities, against token-by-token
    float64 forward passes (a fresh pass per prefix)."""
    policy, ref, tok = _lm(rms["lm"]), _lm(rms["policy"]), _tok(rms["lm"])
    spec = pe.KLSpec((PROMPT,), 4, 5, seed=1)
    s = pe.sample(policy, tok, PROMPT, spec, torch.device("cpu"))
    own, other = pe.logprobs(policy, s, "cpu"), pe.logprobs(ref, s, "cpu")
    stop = pe.eos_ids(policy, tok)
    for i, n in enumerate(s.lengths):
        ids = s.ids[i, : s.prompt_len + n].tolist()
        assert 1 <= n <= 5 and (n == 5 or ids[-1] in stop)  # ends at a stop token or the budget
        assert not any(t in stop for t in ids[s.prompt_len: -1])
        a = b = 0.0
        for k in range(s.prompt_len, len(ids)):
            a += float(_next_logp(policy, [ids[:k]])[0, ids[k]])
            b += float(_next_logp(ref, [ids[:k]])[0, ids[k]])
        assert own[i] == pytest.approx(a, abs=1e-9) and other[i] == pytest.approx(b, abs=1e-9)


def test_samples_are_seeded_per_prompt():
    spec = pe.KLSpec(("a", "b"), 2, 3, seed=0)
    assert pe.seed_for(0, "a") == pe.seed_for(0, "a") != pe.seed_for(1, "a") != pe.seed_for(0, "b")
    assert spec.prompts == ("a", "b")


@pytest.mark.parametrize(("p", "n", "lo", "hi"), [
    # Wilson score intervals (95%), as tabulated by Newcombe (1998), Stat. Med. 17:857, table I
    (0.5, 10, 0.2366, 0.7634),
    (0.0, 10, 0.0, 0.2775),
    (1.0, 29, 0.8830, 1.0),
    (15 / 148, 148, 0.0624, 0.1605),
])
def test_wilson_interval_matches_published_values(p, n, lo, hi):
    got = pe.wilson(p, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


def test_kl_estimate_mean_and_standard_error():
    x = [0.3, -0.1, 0.7, 0.2, 0.0]
    est = pe.kl_estimate(x)
    assert est.mean == pytest.approx(np.mean(x)) and est.se == pytest.approx(np.std(x, ddof=1) / math.sqrt(5))


def _responses(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))


def test_winrate_against_a_direct_forward_pass(ws):
    prompts = ["What is 12 plus 30?", "Name a colour.", "Say hello.", "What is 2 times 3?"]
    ours = [(p, r) for p in prompts for r in ("Yes, that is 42.", "It is fine.")]
    base = [(p, r) for p in prompts for r in ("No.", "I cannot say.", "Sure: blue.")]
    _responses(ws / "ours.jsonl", ours)
    _responses(ws / "base.jsonl", base)
    run_rewards(ws, 'winrate(reward("models/rm-helpful"), responses("ours.jsonl"), responses("base.jsonl"), '
                    'out="out/w.json")')
    got = json.loads((ws / "out" / "w.json").read_text())
    d = Direct(ws / "models" / "rm-helpful")
    outcomes = []
    for p in prompts:
        a = np.mean([d(p, r) for q, r in ours if q == p])
        b = np.mean([d(p, r) for q, r in base if q == p])
        outcomes.append(1.0 if a > b + 1e-6 else 0.0 if a < b - 1e-6 else 0.5)
    assert got["prompts"] == 4 and got["winrate"] == pytest.approx(np.mean(outcomes))
    assert got["ci95"] == pytest.approx(list(pe.wilson(np.mean(outcomes), 4)))
    assert got["wins"] + got["ties"] + got["losses"] == 4


def test_winrate_ties_count_half():
    res = pe.win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 4.0, 0.0])
    assert res["winrate"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4) and res["ties"] == 2


def test_winrate_needs_a_base_sample_for_every_prompt(ws):
    from algebra.errors import AlgRuntimeError

    _responses(ws / "ours.jsonl", [("a", "x"), ("b", "y")])
    _responses(ws / "base.jsonl", [("a", "z")])
    with pytest.raises(AlgRuntimeError, match="no base sample"):
        run_rewards(ws, 'winrate(reward("models/rm-helpful"), responses("ours.jsonl"), responses("base.jsonl"))')


def test_front_of_a_sweep(ws, monkeypatch):
    text = ('ref = load("models/policy")\n'
            'ps = [lerp(ref, load("models/lm"), t) for t in [0.0, 1.0]]\n'
            f'front(ps, ref, reward("models/rm-helpful"), ["{PROMPT}", "Name a colour."], "out/front.json", '
            'x=[0.0, 1.0], xlabel="t", plot="out/front.png", n=3, max_new_tokens=4)\n')
    session, checked = check(ws, text)
    from algebra.reward import engine

    run = engine.run_sinks(checked.sinks, session.options)
    got = json.loads((ws / "out" / "front.json").read_text())
    assert (ws / "out" / "front.png").read_bytes()[:4] == b"\x89PNG"
    (a, b) = got["results"]
    assert (a["x"], b["x"]) == (0.0, 1.0) and got["xlabel"] == "t" and a["samples"] == 6
    assert a["kl"] == pytest.approx(0.0, abs=1e-6)  # t=0 is the reference itself
    assert b["kl"] != pytest.approx(0.0, abs=1e-6)
    # each point's reward is r's mean over that policy's own samples
    req = checked.sinks[0].value
    assert isinstance(req, KLRequest)
    d = Direct(ws / "models" / "rm-helpful")
    for res, pm in zip((a, b), req.policies, strict=True):
        values = [d(p, r) for p, r in run.kl_result(pm, req).responses.points()]
        assert res["reward"] == pytest.approx(np.mean(values), abs=1e-4)
        assert res["reward_se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(6), abs=1e-4)
    # seeded: a re-run gives the same numbers
    run_rewards(ws, text.replace('"out/front.png"', '"out/front2.png"').replace('"out/front.json"', '"out/f2.json"'))
    assert json.loads((ws / "out" / "f2.json").read_text())["results"] == got["results"]


@pytest.mark.parametrize(("text", "cls", "message"), [
    ('kl(load("models/rm-helpful"), load("models/policy"), ["hi"])', AlgTypeError, "causal LM"),
    ('kl(load("models/policy"), load("models/policy"), [])', AlgTypeError, "at least one prompt"),
    ('kl(load("models/policy"), load("models/policy"), ["hi"], n=0)', AlgTypeError, "n"),
    ('front([], load("models/policy"), reward("models/rm-helpful"), ["hi"], "o.json")', AlgTypeError,
     "at least one policy"),
    ('front([load("models/lm")], load("models/policy"), reward("models/rm-helpful"), ["hi"], "o.json", x=[1, 2])',
     AlgTypeError, "x has 2 values"),
])
def test_check_errors(ws, text, cls, message):
    with pytest.raises(cls, match=message):
        check(ws, text)


def test_existing_output_is_refused_without_overwrite(ws):
    (ws / "out").mkdir()
    (ws / "out" / "kl.json").write_text("{}")
    with pytest.raises(AlgIOError, match="overwrite"):
        check(ws, 'kl(load("models/lm"), load("models/policy"), ["hi"], out="out/kl.json")')


def test_plan_samples_nothing(ws):
    session, checked = check(ws, f'kl(load("models/lm"), load("models/policy"), ["{PROMPT}"], n=2)')
    from algebra.reward.engine import plan_text

    text = plan_text(checked.sinks, session.options)
    assert "kl: sample 2 text(s)" in text


def test_a_sweep_records_margin_mean_reward_and_sections(ws, rms):
    """Each sweep point's margin and mean reward, overall and per subset, against direct
    forward passes; the plot drawn by section."""
    run_rewards(ws, 'h = reward("models/rm-helpful")\n'
                    'evaluate([h, 2 * h - 1], pairs("data/prefs.jsonl"), "out/e.json", x=[1, 2], plot="out/e.png", '
                    'by="section")\n')
    got = json.loads((ws / "out" / "e.json").read_text())
    d = Direct(rms["rm-helpful"])
    data = [json.loads(line) for line in (ws / "data" / "prefs.jsonl").read_text().splitlines()]
    c = np.array([d(r["prompt"], r["chosen"]) for r in data])
    rj = np.array([d(r["prompt"], r["rejected"]) for r in data])
    for point, (cc, rr) in zip(got["results"], [(c, rj), (2 * c - 1, 2 * rj - 1)], strict=True):
        assert point["margin"] == pytest.approx(np.mean(cc - rr), abs=1e-5)
        assert point["mean_reward"] == pytest.approx(np.mean(np.concatenate([cc, rr])), abs=1e-5)
        for name, sub in point["subsets"].items():
            m = np.array([r["subset"] == name for r in data])
            assert sub["margin"] == pytest.approx(np.mean(cc[m] - rr[m]), abs=1e-5)
        assert set(point["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert got["results"][1]["margin"] == pytest.approx(2 * got["results"][0]["margin"], abs=1e-5)
    assert (ws / "out" / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_by_section_needs_rewardbench_subsets(ws):
    (ws / "p.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "subset": "mine"}) + "\n")
    with pytest.raises(AlgTypeError, match="RewardBench subset names"):
        check(ws, 'evaluate(reward("models/rm-helpful"), pairs("p.jsonl"), "o.json", by="section")')
    with pytest.raises(AlgTypeError, match='"subset" or "section"'):
        check(ws, 'evaluate(reward("models/rm-helpful"), pairs("p.jsonl"), "o.json", by="row")')


def test_a_computed_policy_with_tied_embeddings(ws, rms, tmp_path):
    """A merge of a tied-embedding model (SmolLM2's layout: transformers saves the head once,
    as the embedding) is a policy: it is built from the tensors alg computes, its head
    tied back, and it samples what its saved folder samples."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(rms["policy"])
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    (ws / "models" / "tied").mkdir()
    m.save_pretrained(ws / "models" / "tied")
    _tok(rms["policy"]).save_pretrained(ws / "models" / "tied")
    from safetensors import safe_open

    with safe_open(str(ws / "models" / "tied" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # the layout that used to fail
    run_rewards(ws, f'kl(lerp(load("models/tied"), load("models/tied"), 0.5), load("models/tied"), ["{PROMPT}"], '
                    'n=3, max_new_tokens=3, out="out/kl.json")')
    got = json.loads((ws / "out" / "kl.json").read_text())
    assert got["kl"] == pytest.approx(0.0, abs=1e-6)  # the merge of a model with itself is the model


@pytest.mark.parametrize("n", [1, 3, 7, 1000])
def test_wilson_holds_the_rate_at_the_ends(n):
    """At p = 0 or 1 a bound is p itself, exactly (no rounding below 1 or above 0)."""
    assert pe.wilson(1.0, n)[1] == 1.0 and pe.wilson(1.0, n)[0] < 1.0
    assert pe.wilson(0.0, n)[0] == 0.0 and pe.wilson(0.0, n)[1] > 0.0
