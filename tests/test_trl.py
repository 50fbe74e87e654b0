"""alg rewards as TRL reward functions: names, pickling into a fresh process, chat
messages as chat templates take them, TRL's three tokenisation conventions reproduced
exactly (checked against TRL's own code paths), baselines with missing references, and
GRPO training with an alg reward."""

from __future__ import annotations

import copy
import math
import pickle
import shutil
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch
from conftest import quiet_interpreter
from test_reward import Direct, ref_quantile, rows

from algebra.errors import AlgRuntimeError, AlgTypeError

PROMPTS = ["What is 12 plus 30?", "Solve for x: 2x + 3 = 11."]
COMPLETIONS = ["The answer is 42.", "x = 4."]


def _score(model, tok, texts: list[str], add_special_tokens: bool) -> list[float]:
    """Reward model logits at the last token, one text at a time, in float64."""
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(float(model(input_ids=ids).logits[0, 0].double()))
    return out


@pytest.fixture(scope="module")
def rm_bos(tmp_path_factory, rms) -> Path:
    """rm-helpful whose tokenizer adds a BOS token (a post-processor), so that the three
    conventions give three different token sequences."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    folder = tmp_path_factory.mktemp("rm-bos") / "rm"
    shutil.copytree(rms["rm-helpful"], folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


# ---- names ---------------------------------------------------------------------------------------


def test_rewards_are_named_after_their_binding(ws):
    interp = quiet_interpreter(ws)
    help_ = interp.eval('help = reward("models/rm-helpful")')  # an assignment gives its reward
    assert help_.__name__ == "help"
    r = interp.eval('r = logsig(help) + 1')
    assert r.__name__ == "r"
    assert interp.eval("help").__name__ == "help"
    a, b = interp.eval("logsig(help)"), interp.eval("-help")
    assert a.__name__ != b.__name__ and a.__name__.startswith("alg_reward") and b.__name__.startswith("alg_reward")
    assert interp.eval('harm = reward("models/rm-harmless")').__name__ == "harm"
    x, y = interp.eval("[help, harm]")
    assert (x.__name__, y.__name__) == ("help", "harm")
    assert interp.eval("h2 = 3") is None  # not a reward: no value, as before


# ---- pickling: TRL's async GRPO sends reward_funcs to another process -------------------------------


def test_pickle_round_trip_in_a_fresh_process_scores_the_same(ws, tmp_path, monkeypatch):
    interp = quiet_interpreter(ws)
    r = interp.eval('help = reward("models/rm-helpful")\nrefs = responses("data/ref_samples.jsonl")\n'
                    'r = logsig(help - quantile(help, refs, 0.85)) + 0.5 * reward("models/rm-harmless")')
    here = r(prompts=PROMPTS, completions=COMPLETIONS)
    assert pickle.loads(pickle.dumps(r)).__name__ == "r"
    dup = copy.deepcopy(r)
    assert dup is not r and dup.__name__ == "r" and dup(prompts=PROMPTS, completions=COMPLETIONS) == here
    # a fresh interpreter (spawn): nothing but the pickle; its own, empty score cache, so
    # its models are really loaded and run there
    child_cache = tmp_path / "child-cache"
    monkeypatch.setenv("ALG_CACHE", str(child_cache))
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        there = pool.submit(r, prompts=PROMPTS, completions=COMPLETIONS).result(timeout=300)
    assert there == pytest.approx(here, abs=1e-6)
    with sqlite3.connect(child_cache / "rewards.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] > len(PROMPTS)


def test_pickling_with_bindings_and_without_a_recipe(ws):
    interp = quiet_interpreter(ws)
    r = interp.eval("r = reward(m)", m=ws / "models" / "rm-helpful")
    assert pickle.loads(pickle.dumps(r))(prompts=PROMPTS, completions=COMPLETIONS) == \
        r(prompts=PROMPTS, completions=COMPLETIONS)
    # a checkpoint Result bound into a later eval is replayed by its source
    merged = interp.eval('merge(load("models/rm-helpful"), load("models/lm"), 0.3)')
    dogerm = interp.eval("dogerm = reward(mm)", mm=merged)
    copy_ = pickle.loads(pickle.dumps(dogerm))
    assert copy_.__name__ == "dogerm"
    assert copy_(prompts=PROMPTS, completions=COMPLETIONS) == dogerm(prompts=PROMPTS, completions=COMPLETIONS)
    from algebra.reward.trl import RewardFunction

    with pytest.raises(AlgTypeError, match="not made by Interpreter.eval"):
        pickle.dumps(RewardFunction(r.reward, interp.options, "x"))


# ---- chat messages as chat templates take them ---------------------------------------------------------

TOOL_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] %}{% for b in m['content'] %}{% if b['type'] == 'text' %}{{ b['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if m.get('tool_calls') %}{% for t in m['tool_calls'] %}[call {{ t['function']['name'] }}"
    "({{ t['function']['arguments'] | tojson }})]{% endfor %}{% endif %}</s>{% endfor %}"
)


def test_chat_content_blocks_and_tool_calls(ws, rms, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.data_utils import apply_chat_template

    folder = tmp_path / "rm"
    shutil.copytree(rms["rm-helpful"], folder)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    r = quiet_interpreter(ws).eval(f'r = reward("{folder}")')
    prompt = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + "}, {"type": "text", "text": "3?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"},
    ]
    completions = [[{"role": "assistant", "content": "It is 5."}],
                   [{"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "5."}]}]]
    got = r(prompts=[prompt, prompt], completions=completions)
    # TRL's GRPO path for a conversational batch: its apply_chat_template on prompt +
    # completion, tokenized without special tokens
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    texts = [apply_chat_template({"messages": prompt + c}, tok)["text"] for c in completions]
    assert "[call add(" in texts[0] and "Be brief." in texts[0]
    assert got == pytest.approx(_score(model, tok, texts, False), abs=2e-5)
    assert got[0] == got[1]  # text blocks are their text
    with pytest.raises(AlgTypeError, match="content: text, None or a list of typed blocks"):
        r(prompts=[[{"role": "user", "content": 3}]], completions=["x"])


# ---- TRL's three conventions --------------------------------------------------------------------------


def test_grpo_text_convention(ws, rm_bos):
    """GRPO with a reward model, string prompts: `prompt + completion`, tokenized with
    add_special_tokens=False (grpo_trainer._calculate_rewards), right-padded in a batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    r = quiet_interpreter(ws).eval(f'r = reward("{rm_bos}", template="{{prompt}}{{response}}", '
                                   'add_special_tokens=false)')
    got = r(prompts=PROMPTS, completions=COMPLETIONS)
    tok = AutoTokenizer.from_pretrained(rm_bos)
    model = AutoModelForSequenceClassification.from_pretrained(rm_bos).eval()
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    # TRL's own call, transcribed: one batch, right padding
    inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        trl_scores = model(**inputs).logits[:, 0].tolist()
    assert got == pytest.approx(trl_scores, abs=2e-5)
    assert got == pytest.approx(_score(model, tok, texts, False), abs=2e-5)
    # the default (chat template) and a BOS differ: the conventions are really distinct
    default = quiet_interpreter(ws).eval(f'reward("{rm_bos}")')(prompts=PROMPTS, completions=COMPLETIONS)
    with_bos = _score(model, tok, texts, True)
    assert all(abs(a - b) > 1e-4 for a, b in zip(got, default, strict=True))
    assert all(abs(a - b) > 1e-4 for a, b in zip(got, with_bos, strict=True))


def test_reward_trainer_convention(ws, rm_bos, tmp_path):
    """RewardTrainer on text pairs: `<bos>prompt + chosen<eos>`: TRL's own preprocessing
    (RewardTrainer._prepare_dataset) gives the token ids alg scores."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from algebra.reward.plan import encode, tokenizer_for

    chosen = [COMPLETIONS[0], COMPLETIONS[1] + "</s>"]  # one already ends with EOS: none is added
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": "No."} for p, c in zip(PROMPTS, chosen, strict=True)])
    tok = AutoTokenizer.from_pretrained(rm_bos)
    args = RewardConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, dataset_num_proc=None)
    trainer = RewardTrainer(model=str(rm_bos), args=args, train_dataset=data, processing_class=tok)
    trl_ids = [row["chosen_ids"] for row in trainer.train_dataset]
    assert trl_ids[0][0] == tok.bos_token_id and trl_ids[0][-1] == tok.eos_token_id

    r = quiet_interpreter(ws).eval(f'r = reward("{rm_bos}", template="{{prompt}}{{response}}{{eos}}")')
    leaf = r.reward
    assert [encode(leaf, tokenizer_for(leaf), p, c) for p, c in zip(PROMPTS, chosen, strict=True)] == trl_ids
    model = AutoModelForSequenceClassification.from_pretrained(rm_bos).eval()
    expect = []
    for ids in trl_ids:
        with torch.no_grad():
            expect.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert r(prompts=PROMPTS, completions=chosen) == pytest.approx(expect, abs=2e-5)

    # conversational pairs: TRL applies the chat template (its special tokens only), as
    # alg's default does
    conv = Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                               "chosen": [{"role": "assistant", "content": c}],
                               "rejected": [{"role": "assistant", "content": "No."}]}
                              for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    trainer = RewardTrainer(model=str(rm_bos), args=args, train_dataset=conv, processing_class=tok)
    chat = quiet_interpreter(ws).eval(f'reward("{rm_bos}")').reward
    got = [encode(chat, tokenizer_for(chat), p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert got == [row["chosen_ids"] for row in trainer.train_dataset]
    assert got[0][0] == tok.bos_token_id and got[0][1] != tok.bos_token_id  # the template's <s>, no second one


# ---- baselines of prompts with no references ---------------------------------------------------------

NEW_PROMPT = "Name a prime number above 10."


def test_missing_references_error_by_default(ws):
    r = quiet_interpreter(ws).eval('help = reward("models/rm-helpful")\n'
                                   'r = help - quantile(help, responses("data/ref_samples.jsonl"), 0.5)')
    with pytest.raises(AlgRuntimeError, match="no reference responses.*missing="):
        r(prompts=[NEW_PROMPT], completions=["13."])


def test_missing_references_fixed_value(ws, rms):
    r = quiet_interpreter(ws).eval('help = reward("models/rm-helpful")\n'
                                   'r = help - baseline(help, responses("data/ref_samples.jsonl"), missing=0.25)')
    H = Direct(rms["rm-helpful"])
    refs: dict[str, list[str]] = {}
    for row in rows(ws / "data" / "ref_samples.jsonl"):
        refs.setdefault(row["prompt"], []).append(row["response"])
    got = r(prompts=[NEW_PROMPT, PROMPTS[0]], completions=["13.", COMPLETIONS[0]])
    expect = [H(NEW_PROMPT, "13.") - 0.25,
              H(PROMPTS[0], COMPLETIONS[0]) - sum(H(PROMPTS[0], x) for x in refs[PROMPTS[0]]) / len(refs[PROMPTS[0]])]
    assert got == pytest.approx(expect, abs=1e-4)


def test_missing_references_generated_from_a_policy_and_cached(ws, rms, monkeypatch):
    from algebra.reward import generate as gen_mod
    from algebra.reward.cache import model_hash

    text = ('help = reward("models/rm-helpful")\n'
            'g = generate("models/policy", ["unused"], n=3, max_new_tokens=6, seed=7)\n'
            'r = help - quantile(help, responses("data/ref_samples.jsonl"), 0.5, missing=g)')
    interp = quiet_interpreter(ws)
    r = interp.eval(text)
    got = r(prompts=[NEW_PROMPT], completions=["13."])
    g = interp.session.checker.env.values["g"]
    samples = gen_mod.cached_samples(model_hash(g.node), g.spec, NEW_PROMPT)
    assert samples is not None and len(samples) == 3  # sampled for the prompt that lacked references
    H = Direct(rms["rm-helpful"])
    expect = H(NEW_PROMPT, "13.") - ref_quantile([H(NEW_PROMPT, s) for s in samples], 0.5)
    assert got == pytest.approx([expect], abs=1e-4)
    # cached: another process-like copy samples nothing
    monkeypatch.setattr(gen_mod, "sample_batch", lambda *a, **k: pytest.fail("sampled again"))
    again = quiet_interpreter(ws).eval(text)
    assert again(prompts=[NEW_PROMPT], completions=["13."]) == got


def test_missing_option_is_checked(ws):
    interp = quiet_interpreter(ws)
    with pytest.raises(AlgTypeError, match='missing must be "error"'):
        interp.eval('quantile(reward("models/rm-helpful"), responses("data/ref_samples.jsonl"), 0.5, missing="skip")')
    with pytest.raises(AlgTypeError, match="cannot answer for prompts it lacks"):
        interp.eval('baseline(reward("models/rm-helpful"), responses("data/ref_samples.jsonl"), '
                    'missing=responses("data/ref_samples.jsonl"))')


# ---- GRPO trains with an alg reward --------------------------------------------------------------------


def test_grpo_trains_and_logs_alg_rewards(ws, rms, tmp_path):
    """Two GRPO steps on the tiny policy. TRL's own reward-model path (the reward model
    given as a model) and alg's reward with TRL's text convention log the same rewards."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    interp = quiet_interpreter(ws)
    same = interp.eval('same = reward("models/rm-helpful", template="{prompt}{response}", add_special_tokens=false)')
    chat = interp.eval('chat = reward("models/rm-helpful")')
    calls: list = []

    def recorded(prompts, completions, **kw):
        calls.append((list(prompts), list(completions)))
        return chat(prompts=prompts, completions=completions, **kw)

    recorded.__name__ = "chat"
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=2, logging_steps=1,
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                      learning_rate=1e-4, save_strategy="no", seed=0,
                      bf16=False)  # TRL defaults to bf16 autocast, which its reward-model path runs under
    trainer = GRPOTrainer(model=str(rms["policy"]), reward_funcs=[str(rms["rm-helpful"]), same, recorded],
                          args=args, train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/same/mean" in h]
    assert len(logs) == 2
    rm_name = Path(rms["rm-helpful"]).name
    for h in logs:
        assert h[f"rewards/{rm_name}/mean"] == pytest.approx(h["rewards/same/mean"], abs=1e-4)
        assert math.isfinite(h["rewards/chat/mean"])
    # the logged chat-template rewards are alg's scores of what was generated
    H = Direct(rms["rm-helpful"])
    for h, (ps, cs) in zip(logs, calls, strict=True):
        mean = sum(H(p, c) for p, c in zip(ps, cs, strict=True)) / len(ps)
        assert h["rewards/chat/mean"] == pytest.approx(mean, abs=1e-4)
