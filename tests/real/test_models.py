"""The real model end to end: DogeRM and reward scores equal to transformers' with the
real ChatML template, and a WARP iteration that still answers a question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_numeric import ref_merge

from algebra import Interpreter, Options

from .build import PAIRS, chat
from .conftest import read_tensors

pytestmark = pytest.mark.real

# chat-formatted pairs that the reward model did not see while its head was trained
HELD_OUT = [
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level.", "Who knows."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit.", "I refuse to answer."),
    ("How many continents are there?", "There are seven continents.", "Not telling you."),
    ("What is the opposite of cold?", "The opposite of cold is hot.", "Leave me alone."),
]


def interp(base: Path) -> Interpreter:
    return Interpreter(options=Options(device="cpu", warn=lambda d: None, out=lambda s: None), base_dir=base)


def write_rows(path: Path, pairs) -> list[tuple[str, str]]:
    rows = [(p, a) for p, good, bad in pairs for a in (good, bad)]
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "response": a}) + "\n"
                            for i, (p, a) in enumerate(rows)))
    return rows


def hf_scores(folder: Path, tok, rows) -> list[float]:
    """transformers' own scores: the chat template's text, tokenized as it renders it (no
    added special tokens), the logit at the last token, in float32."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, answer in rows:
            ids = tok(chat(tok, prompt, answer), return_tensors="pt", add_special_tokens=False)
            out.append(float(model(**ids).logits[0, 0]))
    return out


def alg_scores(path: Path) -> list[float]:
    got = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["reward"] for r in sorted(got, key=lambda r: int(r["id"][1:]))]


def test_reward_scores_equal_transformers_with_the_real_chat_template(real, real_tok, tmp_path, monkeypatch):
    from algebra.reward import models

    rows = write_rows(tmp_path / "data.jsonl", HELD_OUT)
    blocks = []
    real_cache = models.block_cache
    monkeypatch.setattr(models, "block_cache", lambda *a: blocks.append(r := real_cache(*a)) or r)
    interp(tmp_path).eval(f'score(reward("{real["rm"]}"), "data.jsonl", "scores.jsonl")')
    # each pair's answers share the system turn and the prompt: scored after a cached prefix
    assert blocks and all(b is not None for b in blocks)
    ours = alg_scores(tmp_path / "scores.jsonl")
    theirs = hf_scores(real["rm"], real_tok, rows)
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-4)
    # the template is the real ChatML one (with its default system turn), and the trained
    # head prefers the helpful answer on the held-out pairs it never saw
    assert chat(real_tok, "q", "a").startswith("<|im_start|>system\n")
    assert all(ours[2 * i] > ours[2 * i + 1] for i in range(len(HELD_OUT)))


def test_dogerm_merge_scored_by_alg_and_by_transformers(real, real_tok, tmp_path):
    rows = write_rows(tmp_path / "data.jsonl", PAIRS[:3] + HELD_OUT[:2])
    interp(tmp_path).eval(
        f'm = merge(load("{real["rm"]}"), load("{real["ft1"]}"), 0.3)\n'
        'save(m, "out/dogerm")\n'
        'score(reward(m), "data.jsonl", "computed.jsonl")\n')
    out = tmp_path / "out" / "dogerm"
    # the merged weights: DogeRM's rule in float64, within the stored bf16's rounding (alg
    # computes in float32 and rounds once; the float64 value rounded may differ by an ulp)
    keep = lambda n: ".layers.26." in n or n in ("score.weight", "model.norm.weight")  # noqa: E731
    rm, ft = (read_tensors(real[n], keep) for n in ("rm", "ft1"))
    saved = read_tensors(out, keep)
    want = ref_merge({k: v.double() for k, v in rm.items()}, {k: v.double() for k, v in ft.items()}, 0.3)
    assert set(saved) == set(want) and "score.weight" in saved
    for k, v in want.items():
        assert saved[k].dtype == torch.bfloat16
        torch.testing.assert_close(saved[k].double(), v, rtol=2**-8, atol=1e-7)
        assert (saved[k].double() != v.to(torch.bfloat16).double()).double().mean() < 1e-3
    # scored by alg (the merge computed in memory, and the saved folder) and by transformers
    interp(tmp_path).eval('score(reward("out/dogerm"), "data.jsonl", "saved.jsonl")')
    theirs = hf_scores(out, real_tok, rows)
    assert alg_scores(tmp_path / "saved.jsonl") == pytest.approx(theirs, rel=1e-4, abs=1e-4)
    assert alg_scores(tmp_path / "computed.jsonl") == pytest.approx(theirs, rel=1e-4, abs=1e-4)
    # the merge changed the scores (the fine-tune's layers moved the reward model)
    plain = hf_scores(real["rm"], real_tok, rows)
    assert max(abs(a - b) for a, b in zip(plain, theirs, strict=True)) > 1e-3


def answer(folder: Path, tok, question: str, tokens: int = 24) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_warp_iteration_loads_and_answers(real, real_tok, tmp_path):
    interp(tmp_path).eval(
        f'init = load("{real["base"]}")\n'
        f'merged = slerp([load("{real["ft1"]}"), load("{real["ft2"]}")], base=init, per="layer")\n'
        'save(liti(init, merged, 0.3), "out/warp")\n')
    out = tmp_path / "out" / "warp"
    # the policies' layers moved, the untrained ones did not
    base, ft1, warp = (read_tensors(p, lambda n: ".layers.2" in n or ".layers.1." in n)
                       for p in (real["base"], real["ft1"], out))
    k = "model.layers.25.mlp.down_proj.weight"
    assert not torch.equal(warp[k], base[k]) and not torch.equal(warp[k], ft1[k])
    assert torch.equal(warp["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"])
    for folder in (real["base"], out):
        text = answer(folder, real_tok, "What is the capital of France?")
        assert "Paris" in text, (folder.name, text)
