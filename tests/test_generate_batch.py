"""generate's batched sampling: greedy batches equal the one-prompt loop under left padding,
a sample does not depend on the batch it is in, stop strings, seeding, cache keys and
reuse, the chat template, and the options' checks."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from test_reward import check

from algebra.errors import AlgTypeError
from algebra.reward import generate as gen
from algebra.reward.batching import cut_sorted
from algebra.reward.generate import GenerateSpec, cut, sample, sample_batch

# prompts of very different token lengths (and a chat-message prompt with a system turn),
# so that a batch pads most rows on the left
PROMPTS = (
    "Hi",
    "What is 12 plus 30?",
    "Write a long poem about the sea, the sky, the mountains and the rivers of the north, please.",
    (("system", "You are terse."), ("user", "Name a colour.")),
    "Why is the sky blue? Explain it briefly to a child.",
)


@pytest.fixture(scope="module")
def policy(rms):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(rms["policy"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(rms["policy"])


def spec(prompts=PROMPTS, n=1, temperature=0.0, max_new_tokens=12, seed=0, stop=(), batch_size=None):
    return GenerateSpec(tuple(prompts), n, temperature, max_new_tokens, seed, tuple(stop), batch_size)


def test_greedy_batches_equal_the_one_prompt_loop(policy):
    model, tok = policy
    lengths = [len(gen.encode(tok, p)) for p in PROMPTS]
    assert max(lengths) - min(lengths) > 15  # rows really are left-padded
    s = spec(n=2)
    alone = {p: sample(model, tok, s, p, "cpu") for p in PROMPTS}
    assert all(len(v) == 2 and v[0] == v[1] for v in alone.values())  # greedy: n copies
    assert len({v[0] for v in alone.values()}) >= 3  # different texts, so the check bites
    for bs in (None, 2):
        assert sample_batch(model, tok, spec(n=2, batch_size=bs), PROMPTS, "cpu") == alone


def test_left_padding_needs_the_mask(policy):
    # the check above could fail: the same padded batch without its attention mask (pads
    # attended to, positions counted from the pad) gives other texts
    model, tok = policy
    s = spec()
    ids = [gen.encode(tok, p) for p in PROMPTS[:3]]
    width = max(map(len, ids))
    batch = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    with torch.no_grad():
        out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=12,
                             pad_token_id=tok.pad_token_id)
    naive = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    alone = [sample(model, tok, s, p, "cpu")[0] for p in PROMPTS[:3]]
    assert naive != alone


def test_a_sample_does_not_depend_on_its_batch(policy):
    model, tok = policy
    p = PROMPTS[1]
    base = sample_batch(model, tok, spec([p], n=3, temperature=0.9, max_new_tokens=8), (p,), "cpu")[p]
    assert len(set(base)) > 1  # samples differ from each other
    for prompts, bs in (((PROMPTS[0], p, PROMPTS[2]), None), ((PROMPTS[2], PROMPTS[4], p), 3), ((p,), 1)):
        got = sample_batch(model, tok, spec(prompts, n=3, temperature=0.9, max_new_tokens=8, batch_size=bs), prompts, "cpu")
        assert got[p] == base
    # sample j depends on (seed, prompt, j): not on n; another seed draws others
    assert sample_batch(model, tok, spec([p], n=2, temperature=0.9, max_new_tokens=8), (p,), "cpu")[p] == base[:2]
    assert sample_batch(model, tok, spec([p], n=3, temperature=0.9, max_new_tokens=8, seed=1), (p,), "cpu")[p] != base


def test_each_row_samples_from_its_own_generator(policy):
    # independent reference: the first token of sample j is torch.multinomial over
    # softmax(logits / T), drawn from a generator seeded with the row's seed
    model, tok = policy
    T, p = 0.7, PROMPTS[2]
    s = spec((PROMPTS[0], p), n=5, temperature=T, max_new_tokens=1)
    got = sample_batch(model, tok, s, s.prompts, "cpu")[p]
    with torch.no_grad():
        logits = model(torch.tensor([gen.encode(tok, p)])).logits[0, -1].double()
    probs = torch.softmax(logits / T, dim=-1).float()
    want = []
    for j in range(5):
        g = torch.Generator().manual_seed(gen._row_seed(s, p, j))
        want.append(tok.decode([int(torch.multinomial(probs, 1, generator=g))], skip_special_tokens=True))
    assert got == want


def test_stop_strings(policy):
    model, tok = policy
    full = {p: sample(model, tok, spec(max_new_tokens=16), p, "cpu")[0] for p in PROMPTS}
    p = PROMPTS[1]
    ids = tok(full[p], add_special_tokens=False).input_ids
    # a stop string of three tokens from the middle of the text (whole characters)
    multi = next(x for x in (tok.decode(ids[k:k + 3]) for k in range(2, len(ids) - 3)) if x in full[p][1:])
    assert len(tok(multi, add_special_tokens=False).input_ids) > 1 and multi in full[p]
    absent = "\u2603never"
    assert absent not in "".join(full.values())
    for stop in ((multi,), (full[p][:2],), (absent,), (absent, multi, full[p][-3:])):
        got = sample_batch(model, tok, spec(max_new_tokens=16, stop=stop), PROMPTS, "cpu")
        for q in PROMPTS:  # every row of the batch is cut where its own text has a stop
            at = min([full[q].find(x) for x in stop if x in full[q]], default=len(full[q]))
            assert got[q] == [full[q][:at]]
        assert sample(model, tok, spec(max_new_tokens=16, stop=stop), p, "cpu") == got[p]
    assert sample_batch(model, tok, spec([p], max_new_tokens=16, stop=(full[p][:2],)), (p,), "cpu")[p] == [""]
    assert cut("abXYcdXY", ("cd", "XY")) == "ab" and cut("abc", ()) == "abc"


def test_a_row_ends_at_its_stop_string(policy):
    model, tok = policy
    p = PROMPTS[1]
    full = sample(model, tok, spec(max_new_tokens=16), p, "cpu")[0]
    steps: list = []
    hook = model.register_forward_hook(lambda *a: steps.append(1))
    try:
        sample_batch(model, tok, spec([p], max_new_tokens=16, stop=(full[:3],)), (p,), "cpu")
    finally:
        hook.remove()
    assert len(steps) < 16 // 2


def test_the_chat_template_is_applied(policy):
    model, tok = policy
    msgs = PROMPTS[3]
    text = tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<s>system: You are terse.</s><s>user: Name a colour.</s>")
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=tok.pad_token_id)
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert sample_batch(model, tok, spec(), PROMPTS, "cpu")[msgs] == [want]
    # without a chat template: the prompt's text with the tokenizer's special tokens
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert gen.encode(plain, "Hi") == plain("Hi").input_ids and gen.encode(plain, "Hi") != gen.encode(tok, "Hi")


def test_a_tokenizer_without_a_pad_token_pads_with_eos(policy):
    model, tok = policy
    nopad = copy.deepcopy(tok)
    nopad.pad_token = None
    assert nopad.pad_token_id is None and gen.pad_of(nopad) == tok.eos_token_id
    alone = {p: sample(model, nopad, spec(), p, "cpu") for p in PROMPTS}
    assert sample_batch(model, nopad, spec(), PROMPTS, "cpu") == alone


def test_batches_fit_the_token_budget():
    lengths = [300, 200, 100, 100, 10, 10, 10]
    got = cut_sorted(lengths, None, extra=64)
    assert [r.start for r in got] == sorted(r.start for r in got) and sum(map(len, got)) == len(lengths)
    for r in got:  # the first row of a batch is its longest
        assert len(r) == 1 or len(r) * (lengths[r.start] + 64) <= gen.BATCH_TOKENS
    assert [list(r) for r in cut_sorted(lengths, 3, extra=64)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [len(r) for r in cut_sorted([gen.BATCH_TOKENS * 2], None, extra=64)] == [1]


def test_cache_keys_and_reuse(policy, tmp_path, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(tmp_path / "cache"))
    model, tok = policy
    loads: list = []

    def load():
        loads.append(1)
        return model, tok, "cpu"

    from algebra.graph import Node

    s = spec(PROMPTS[:2], n=2, temperature=0.9, batch_size=1)
    g = gen.Generated(Node("leaf", ()), s, "policy", None)
    first, sampled = gen.resolve(g, "h", load)
    assert sampled == 2 and loads == [1]
    again, sampled = gen.resolve(g, "h", load)
    assert sampled == 0 and loads == [1] and again.rows == first.rows
    # a longer prompt list samples only the new prompt; the old ones' samples are unchanged
    more = gen.Generated(g.node, spec(PROMPTS[:3], n=2, temperature=0.9), "policy", None)
    got, sampled = gen.resolve(more, "h", load)
    assert sampled == 1 and loads == [1, 1]
    assert {p: v for p, v in got.by_prompt().items() if p in PROMPTS[:2]} == first.by_prompt()

    # keys: greedy without stop strings keeps the key it had before batching
    def old_key(sp, p):
        blob = json.dumps(["h", p, sp.n, sp.temperature, sp.max_new_tokens, sp.seed], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    greedy = spec(n=2)
    assert gen._sample_key("h", greedy, "Hi") == old_key(greedy, "Hi")
    assert gen._sample_key("h", spec(n=2, batch_size=3), "Hi") == old_key(greedy, "Hi")
    # sampling (a new scheme) and stop strings are named in the key
    assert gen._sample_key("h", s, "Hi") != old_key(s, "Hi")
    assert gen._sample_key("h", spec(n=2, stop=("x",)), "Hi") not in (
        old_key(greedy, "Hi"), gen._sample_key("h", spec(n=2, stop=("y",)), "Hi"))


def test_generate_options_are_checked(ws):
    session, checked = check(ws, 'g = generate(load("models/policy"), ["hi"], stop=["\\n", "User:"], batch_size=4)')
    g = session.checker.env.values["g"]
    assert g.spec.stop == ("\n", "User:") and g.spec.batch_size == 4
    _, checked = check(ws, 'g = generate(load("models/policy"), ["hi"], stop="END")')
    for bad, at in (('stop=""', '""'), ('stop=["a", ""]', '["a", ""]'), ("batch_size=0", "0")):
        with pytest.raises(AlgTypeError) as e:
            check(ws, f'g = generate(load("models/policy"), ["hi"], {bad})')
        assert e.value.span.text() == at
