"""Scoring batched by a token budget (reward/batching.py, reward/plan.py) and the thread
setting (--threads, ALG_THREADS, RunConfig.apply_threads).

Scores are checked against an independent reference written here: transformers' plain
forward pass of each text alone, unpadded, in float64. The budget cutting is checked by
its properties (no batch over the budget unless one text is, every row once, order
restored after un-sorting) and against generation's former rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import alg_main
from hypothesis import given, settings
from hypothesis import strategies as st

from algebra import Options
from algebra.errors import AlgUsageError
from algebra.interpreter import Session
from algebra.reward import batching, engine, models
from algebra.reward import generate as gen
from algebra.runconfig import RunConfig, auto_threads, free_cores
from algebra.source import Source

# ---- the cut -------------------------------------------------------------------------------

lengths_st = st.lists(st.integers(1, 300), max_size=60)


@settings(max_examples=200, deadline=None)
@given(lengths_st, st.integers(0, 64), st.integers(1, 2000), st.booleans())
def test_budget_batches_keep_within_the_budget_and_cover_every_row_once(lengths, extra, budget, longest_first):
    parts = batching.sorted_batches(lengths, None, extra, budget, longest_first)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(lengths)))  # every row once
    key = (lambda i: (-lengths[i], i)) if longest_first else (lambda i: (lengths[i], i))
    assert flat == sorted(range(len(lengths)), key=key)  # sorted by length, ties in their order
    for k, p in enumerate(parts):
        width = max(lengths[i] for i in p) + extra
        assert len(p) == 1 or len(p) * width <= budget  # over budget only as a text alone
        if k + 1 < len(parts):  # greedy: the next row would not have fitted
            nxt = parts[k + 1][0]
            assert (len(p) + 1) * (max(width - extra, lengths[nxt]) + extra) > budget
    # un-sorting: scores put back by index give the rows' own order
    got = [None] * len(lengths)
    for p in parts:
        for i in p:
            got[i] = lengths[i]
    assert got == lengths


@given(lengths_st, st.integers(1, 7))
def test_a_batch_size_cuts_by_count(lengths, bs):
    parts = batching.sorted_batches(lengths, bs)
    assert [len(p) for p in parts] == [min(bs, len(lengths) - s) for s in range(0, len(lengths), bs)]


@given(st.lists(st.integers(1, 5000), max_size=40), st.integers(0, 256))
def test_generation_batches_as_before(lengths, new):
    """generate's batches (now batching.cut_sorted) equal its own former rule on rows sorted
    longest first: k = budget // (longest + max_new_tokens) rows, at least one."""
    rows = sorted(lengths, reverse=True)
    old, i = [], 0
    while i < len(rows):
        k = max(1, gen.BATCH_TOKENS // (rows[i] + new))
        old.append(range(i, min(i + k, len(rows))))
        i += k
    assert batching.cut_sorted(rows, None, extra=new) == old
    assert gen.BATCH_TOKENS is batching.BATCH_TOKENS


# ---- scores against a float64 reference ------------------------------------------------------


def _reference(folder: Path, texts: list[tuple[str, str]]) -> list[float]:
    """Each text alone, unpadded, in float64: transformers' own forward pass."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for prompt, response in texts:
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


def _score(ws: Path, reward_args: str, out: str) -> tuple[engine.RewardRun, list[dict]]:
    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    checked = session.check(Source(f'score(reward("models/rm-helpful"{reward_args}), '
                                   f'"data/prompts_responses.jsonl", "{out}")', "t.alg"))
    run = engine.run_sinks(checked.sinks, session.options)
    return run, [json.loads(line) for line in (ws / out).read_text().splitlines()]


def test_budget_batches_score_as_each_text_alone_in_float64(ws, rms, monkeypatch):
    rows_in = [json.loads(line) for line in (ws / "data" / "prompts_responses.jsonl").read_text().splitlines()]
    ref = _reference(rms["rm-helpful"], [(r["prompt"], r["response"]) for r in rows_in])
    batches: list[list[list[int]]] = []
    real = models.score_batch

    def spy(model, input_ids, pad, device, *rest):
        batches[-1].append([len(x) for x in input_ids])
        return real(model, input_ids, pad, device, *rest)

    monkeypatch.setattr(models, "score_batch", spy)
    got, default = {}, batching.BATCH_TOKENS
    # the default budget (all 12 texts in one padded batch), a budget that cuts them into
    # several, and one text per batch; each with an empty cache so that all are scored
    small_budget = 0
    for name, args in (("budget", ""), ("small", ""), ("one", ", batch_size=1")):
        monkeypatch.setenv("ALG_CACHE", str(ws / f"cache-{name}"))
        if name == "small":  # about three of the longest text
            small_budget = 3 * max(batches[0][0])
            monkeypatch.setattr(batching, "BATCH_TOKENS", small_budget)
        batches.append([])
        run, out = _score(ws, args, f"out/{name}.jsonl")
        monkeypatch.setattr(batching, "BATCH_TOKENS", default)
        assert run.scored == len(rows_in)
        assert [r["id"] for r in out] == [r["id"] for r in rows_in]  # input order
        got[name] = [r["reward"] for r in out]
        for v, w in zip(got[name], ref, strict=True):
            assert v == pytest.approx(w, abs=2e-5)
    big, small, one = batches
    assert len(big) == 1 and len(set(big[0])) > 1  # one batch, texts of several lengths: padded
    assert len(small) > 2 and all(len(b) == 1 or len(b) * max(b) <= small_budget for b in small)
    assert any(len(b) > 1 for b in small)
    assert all(len(b) == 1 for b in one)


def test_batching_leaves_the_cache_keys_as_they_were(ws, monkeypatch):
    """A cache filled by batch_size batches (the former default, 16) is hit whole by the
    budget batches: the batching is not part of a text's key."""
    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))
    first, a = _score(ws, ", batch_size=16", "out/a.jsonl")
    again, b = _score(ws, "", "out/b.jsonl")
    assert first.scored == 12 and again.scored == 0
    assert [r["reward"] for r in a] == [r["reward"] for r in b]


def test_two_models_on_one_tokenizer_tokenize_each_text_once(ws, monkeypatch):
    from algebra.reward import plan as plan_mod

    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))
    calls: list = []
    real = plan_mod.encode
    monkeypatch.setattr(plan_mod, "encode", lambda leaf, tok, p, r: calls.append((p, r)) or real(leaf, tok, p, r))
    from transformers import AutoTokenizer

    loads: list = []
    real_load = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(plan_mod, "_TOKENIZERS", {})
    # the two folders' tokenizer_config.json differ only in how they were saved
    configs = [json.loads((ws / "models" / m / "tokenizer_config.json").read_text()) for m in ("rm-helpful", "rm-harmless")]
    assert configs[0] != configs[1]
    assert {k: v for k, v in configs[0].items() if k not in plan_mod._LOAD_KEYS} == \
        {k: v for k, v in configs[1].items() if k not in plan_mod._LOAD_KEYS}
    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    checked = session.check(Source('r = reward("models/rm-helpful") + reward("models/rm-harmless")\n'
                                   'score(r, "data/prompts_responses.jsonl", "out/s.jsonl")', "t.alg"))
    run = engine.run_sinks(checked.sinks, session.options)
    assert run.scored == 24 and run.loads == 2  # both models scored every text
    assert len(calls) == len(set(calls)) == 12  # each text tokenized once, for both
    assert len(loads) == 1  # and one tokenizer loaded for both


def test_tokenizers_differing_in_what_they_are_load_apart(tmp_path):
    from algebra.reward.plan import _tokenizer_key

    a, b = tmp_path / "a", tmp_path / "b"
    for d, extra in ((a, {}), (b, {"is_local": True})):
        d.mkdir()
        (d / "tokenizer.json").write_text('{"model": 1}')
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", **extra}))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_labels": 1 + len(extra)}))
    assert _tokenizer_key(a) == _tokenizer_key(b)  # load flags and the model's own config do not count
    for name, text in (("tokenizer_config.json", '{"eos_token": "<|end|>"}'), ("tokenizer.json", '{"model": 2}'),
                       ("config.json", '{"model_type": "gpt2"}'), ("chat_template.jinja", "{{ x }}")):
        c = tmp_path / f"c-{name}"
        c.mkdir()
        for f in a.iterdir():
            (c / f.name).write_bytes(f.read_bytes())
        (c / name).write_text(text)
        assert _tokenizer_key(c) != _tokenizer_key(a), name


def test_models_run_with_sdpa_attention(ws, rms):
    """transformers' default for a loaded folder and for a model built from its config
    (a computed checkpoint): scaled-dot-product attention, not the eager kernel."""
    from algebra.reward.models import load_model

    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    session.check(Source('a = reward("models/rm-helpful")\n'
                         'b = reward(lerp(load("models/rm-helpful"), load("models/rm-harmless"), 0.5))\n', "t.alg"))
    env = session.checker.env.values
    for name in ("a", "b"):
        leaf = env[name]
        m = load_model(leaf.model, session.options, torch.device("cpu"), torch.float32)
        assert m.config._attn_implementation == "sdpa", name


# ---- threads ---------------------------------------------------------------------------------


def test_thread_setting_is_checked():
    from algebra.options import check_threads

    assert check_threads("3") == 3 and check_threads(2) == 2
    assert check_threads("") == check_threads(" auto ") == "auto"
    for bad in ("0", "-1", "two", "1.5", 0, True):
        with pytest.raises(AlgUsageError, match="thread count"):
            check_threads(bad)


def test_threads_from_the_environment_and_the_options(monkeypatch):
    monkeypatch.setenv("ALG_THREADS", "3")
    assert Options().threads == 3 and RunConfig.of(Options()).threads == 3
    assert Options(threads=1).threads == 1  # an explicit setting wins over the variable
    monkeypatch.delenv("ALG_THREADS")
    assert Options().threads == "auto"
    monkeypatch.setenv("ALG_THREADS", "lots")
    with pytest.raises(AlgUsageError, match="ALG_THREADS: 'lots'"):
        Options()


def test_threads_are_applied_when_the_run_starts():
    before = torch.get_num_threads()
    try:
        want = 3 if before != 3 else 2
        config = RunConfig.of(Options(device="cpu", threads=want))
        assert config.resolve_device().type == "cpu"
        assert torch.get_num_threads() == want
        assert RunConfig.of(Options(device="cpu", threads=1)).apply_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_alg_score_threads_option_sets_torchs_threads(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(tmp_path / "cache"))  # scored here, not read from another test's cache
    before = torch.get_num_threads()
    try:
        (ws / "r.alg").write_text('help = reward("models/rm-helpful")\n')
        got = alg_main("score", "r.alg", "help", "--data", "data/prompts_responses.jsonl", "--out", "o.jsonl",
                       "--device", "cpu", "--threads", "2", cwd=ws)
        assert got.returncode == 0, got.stderr
        assert "on 2 CPU threads" in got.stdout and torch.get_num_threads() == 2
        bad = alg_main("run", "r.alg", "--threads", "0", cwd=ws)
        assert bad.returncode == 2 and "--threads" in bad.stderr and "thread count" in bad.stderr
    finally:
        torch.set_num_threads(before)


def test_auto_threads_are_the_cores_the_load_leaves(monkeypatch):
    assert [free_cores(2, x) for x in (0.0, 0.4, 0.6, 1.0, 1.6, 12.0)] == [2, 2, 1, 1, 1, 1]
    assert free_cores(16, 3.2) == 13 and free_cores(4, -1) == 4
    import algebra.runconfig as rc

    monkeypatch.setattr(rc, "_AUTO", [])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the caller's choice is kept
    assert auto_threads() == 1
    monkeypatch.setattr(rc, "_AUTO", [])
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(rc, "busy_cores", lambda: 50.0)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert auto_threads() == 1  # the machine's busy cores now, not the load average
    monkeypatch.setattr(rc, "busy_cores", lambda: 0.0)
    assert auto_threads() == 1  # decided once per process
    monkeypatch.setattr(rc, "_AUTO", [])
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 0.0, 0.0))  # a load average that lags
    assert auto_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(rc, "_AUTO", [])
    monkeypatch.setattr(rc, "busy_cores", lambda: None)  # no /proc/stat: the load average
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert auto_threads() == free_cores(len(os.sched_getaffinity(0)), 3.0)


def test_busy_cores_reads_the_machines_cpu_time(monkeypatch, tmp_path):
    """busy_cores from two /proc/stat samples: (total - idle - iowait) / total x CPUs."""
    import builtins

    import algebra.runconfig as rc

    lines = iter(["cpu  100 0 100 700 100 0 0 0 0 0\n", "cpu  250 0 150 800 100 0 0 0 0 0\n"])
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if path == "/proc/stat":
            f = tmp_path / "stat"
            f.write_text(next(lines))
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert rc.busy_cores(0.0) == pytest.approx((300 - 100) / 300 * 4)
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert rc.busy_cores(0.0) is None


HEAD = "You are a careful judge of answers; score this one. Question: {prompt} Answer: {response}"


def test_shared_prefixes_are_computed_once_per_block_and_score_as_each_text_alone(ws, rms, monkeypatch):
    """A template with a long fixed head, and pairs of answers to one prompt: the rows are
    grouped by what they share, each block's prefixes are computed once (one forward pass)
    and reused by its batches (several, under a small budget), and every score equals the
    float64 forward pass of the whole text alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))
    rows_in = [json.loads(line) for line in (ws / "data" / "prompts_responses.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(rms["rm-helpful"])
    model = AutoModelForSequenceClassification.from_pretrained(rms["rm-helpful"], dtype=torch.float64).eval()
    ids = [tok(HEAD.format(prompt=r["prompt"], response=r["response"])).input_ids for r in rows_in]
    assert max(len(x) for x in ids) <= 128  # the model's limit truncates none
    with torch.no_grad():
        ref = [float(model(input_ids=torch.tensor([x])).logits[0, 0]) for x in ids]
    made, seen = [], []
    real_cache, real_score = models.block_cache, models.score_batch

    def cache_spy(model, prefixes, pad, device, held):
        if prefixes not in held:
            made.append(prefixes)
        return real_cache(model, prefixes, pad, device, held)

    def score_spy(model, input_ids, pad, device, shared=None, held=None):
        seen.append((input_ids, shared))
        return real_score(model, input_ids, pad, device, shared, held)

    monkeypatch.setattr(models, "block_cache", cache_spy)
    monkeypatch.setattr(models, "score_batch", score_spy)
    monkeypatch.setattr(batching, "BATCH_TOKENS", 3 * max(len(x) for x in ids))
    run, out = _score(ws, f', template="{HEAD}"', "out/p.jsonl")
    assert run.scored == 12
    cached = [(x, sh) for x, sh in seen if sh is not None]
    assert len(made) >= 1 and len(cached) > len(made)  # a block's prefixes serve several batches
    for x, (pre, of) in cached:  # each row starts with its prefix and keeps a token of its own
        assert all(tuple(row[: len(pre.ids[k])]) == pre.ids[k] and len(row) > len(pre.ids[k]) for row, k in zip(x, of, strict=True))
    lens = {len(p) for pre in made for p in pre.ids}
    assert min(lens) >= batching.MIN_PREFIX and len(lens) > 1  # the head alone, and head + prompt
    assert [r["id"] for r in out] == [r["id"] for r in rows_in]
    for row, w in zip(out, ref, strict=True):
        assert row["reward"] == pytest.approx(w, abs=2e-5)


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in _partitions(rest):
        yield [[first]] + p
        for k in range(len(p)):
            yield p[:k] + [[first] + p[k]] + p[k + 1:]


def _common(rows):
    p = 0
    while all(len(r) > p for r in rows) and len({r[p] for r in rows}) == 1:
        p += 1
    return p


rows_st = st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=7), min_size=0, max_size=6)


@settings(max_examples=300, deadline=None)
@given(rows_st, st.data(), st.integers(1, 3))
def test_prefix_groups_save_the_most_tokens(rows, data, min_prefix):
    """Against every partition of the rows (an exhaustive search): the groups save the
    most tokens there are to save, (rows - 1) x shared prefix per group, each prefix at
    least min_prefix and within every member's keep."""
    keep = [data.draw(st.integers(0, len(r))) for r in rows]
    got = batching.prefix_groups(rows, keep, min_prefix)
    parts = [rows[i][: keep[i]] for i in range(len(rows))]
    flat = [i for _, g in got for i in g]
    assert len(flat) == len(set(flat))
    for p, g in got:
        assert len(g) >= 2 and p >= min_prefix and _common([parts[i] for i in g]) >= p
    saving = sum((len(g) - 1) * p for p, g in got)

    def value(part):
        return sum((len(g) - 1) * c for g in part if len(g) > 1 and (c := _common([parts[i] for i in g])) >= min_prefix)

    assert saving == max(value(part) for part in _partitions(list(range(len(rows)))))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=40), max_size=30), st.integers(20, 400),
       st.one_of(st.none(), st.integers(1, 5)))
def test_prefix_batches_cover_every_row_once_within_the_budget(rows, budget, bs):
    keep = [len(r) - 1 for r in rows]
    got = batching.prefix_batches(rows, keep, bs, budget, min_prefix=2)
    flat = [i for part, _, _ in got for i in part]
    assert sorted(flat) == list(range(len(rows)))
    blocks = {}
    for part, pre, of in got:
        if bs:
            assert len(part) <= bs
        if pre is None:
            assert len(part) == 1 or bs or len(part) * max(len(rows[i]) for i in part) <= budget
            continue
        blocks[pre] = pre
        longest = max(map(len, pre.ids))
        assert len(pre.ids) == 1 or len(pre.ids) * longest <= budget
        for i, k in zip(part, of, strict=True):
            assert tuple(rows[i][: len(pre.ids[k])]) == pre.ids[k] and len(pre.ids[k]) <= keep[i]
        width = longest + max(len(rows[i]) - len(pre.ids[k]) for i, k in zip(part, of, strict=True))
        assert len(part) == 1 or bs or len(part) * width <= budget
    assert len({p for pre in blocks for p in pre.ids}) == sum(len(pre.ids) for pre in blocks)  # a prefix in one block


def test_a_row_keeps_the_token_it_is_scored_at():
    """The classifier reads the last token that is not padding: a row never shares it,
    so trailing pad tokens (pad = EOS, a text ending in EOS) stay with it too."""
    from algebra.reward.plan import _last_scored

    assert _last_scored([1, 2, 3], pad=0) == 2
    assert _last_scored([1, 2, 0, 0], pad=0) == 1
    assert _last_scored([0, 0], pad=0) == 0
    rows = [[5] * 20 + [7, 0], [5] * 20 + [7, 0, 0]]
    got = batching.prefix_groups(rows, [_last_scored(r, 0) for r in rows], 4)
    assert got == [(20, [0, 1])]


def test_one_text_batches_reuse_the_blocks_prefixes(rms):
    """batch_size=1: each row of a block is a batch; the block's prefixes are computed for
    its first and held for the rest; a new block replaces them. Scores as each row alone."""
    from transformers import AutoModelForSequenceClassification

    from algebra.reward import models

    model = AutoModelForSequenceClassification.from_pretrained(rms["rm-helpful"]).eval()
    head = list(range(10, 10 + batching.MIN_PREFIX))
    rows = [head + [40, 41], head + [42], head + [43, 44, 45], [7] * 20 + [8], [7] * 20 + [9]]
    cpu = torch.device("cpu")
    calls = []
    real = model.base_model.forward
    model.base_model.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    held: dict = {}
    got = {}
    for part, pre, of in batching.prefix_batches(rows, [len(r) - 1 for r in rows], 1):
        got[part[0]] = models.score_batch(model, [rows[i] for i in part], 0, cpu, (pre, of), held)[0]
    model.base_model.forward = real
    assert len(calls) == 1 + 5  # one prefix pass for the one block, and each row's own
    want = [models.score_batch(model, [r], 0, cpu)[0] for r in rows]
    assert [got[i] for i in range(len(rows))] == pytest.approx(want, abs=1e-5)


def _encoder(inner):
    class Encoder(torch.nn.Module):  # the forward signature of BertForSequenceClassification's kind
        def __init__(self):
            super().__init__()
            self.inner, self.base_model, self.config = inner, inner.base_model, inner.config

        def forward(self, input_ids=None, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    return Encoder()


def test_a_model_without_a_full_attention_cache_scores_rows_whole(rms, tmp_path):
    """A model whose forward takes no cache (an encoder such as BERT or DeBERTa, whose
    prefix tokens see the rest of the text), or whose cache is not full attention (a
    sliding window would drop prefix tokens), scores each row whole: no prefix pass."""
    from transformers import (
        AutoModelForSequenceClassification,
        MistralConfig,
        MistralForSequenceClassification,
    )

    from algebra.reward import models

    inner = AutoModelForSequenceClassification.from_pretrained(rms["rm-helpful"]).eval()
    cfg = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=4, num_labels=1, pad_token_id=0,
                        layer_types=["sliding_attention"] * 2)
    torch.manual_seed(0)
    window = MistralForSequenceClassification(cfg).eval()
    head = list(range(10, 10 + batching.MIN_PREFIX))
    rows = [head + [40, 41], head + [42]]
    shared = (batching.Prefixes((tuple(head),)), [0, 0])
    cpu = torch.device("cpu")
    for model, plain in ((_encoder(inner), inner), (window, window)):
        held: dict = {}
        got = models.score_batch(model, rows, 0, cpu, shared, held)
        assert held == {shared[0]: None}  # found unfit once, for the block
        assert got == pytest.approx(models.score_batch(plain, rows, 0, cpu), abs=1e-6)


def test_a_scored_model_is_released_before_the_next_loads(ws, monkeypatch):
    """Models are loaded one at a time: each is gone when the next loads. Without a
    reference cycle no full garbage collection is needed (a fifth of a second each); a
    model held by a cycle gets one."""
    import gc
    import weakref

    from algebra.reward import models

    monkeypatch.setenv("ALG_CACHE", str(ws / "cache"))
    refs, alive_at_load, collections = [], [], []
    real_load = engine.load_model

    def load(*a, **k):
        alive_at_load.append(sum(r() is not None for r in refs))
        m = real_load(*a, **k)
        refs.append(weakref.ref(m))
        return m

    monkeypatch.setattr(engine, "load_model", load)
    real_collect = gc.collect
    monkeypatch.setattr(models.gc, "collect", lambda *a: collections.append(1) or real_collect(*a))
    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    src = 'score(reward("models/rm-helpful") + reward("models/rm-harmless"), "data/prompts_responses.jsonl", "out/s.jsonl")'
    engine.run_sinks(session.check(Source(src, "t.alg")).sinks, session.options)
    assert alive_at_load == [0, 0] and all(r() is None for r in refs) and collections == []

    def cyclic(*a, **k):  # a model that refers to itself
        m = load(*a, **k)
        object.__setattr__(m, "_cycle", [m])
        return m

    monkeypatch.setattr(engine, "load_model", cyclic)
    monkeypatch.setenv("ALG_CACHE", str(ws / "cache2"))
    refs.clear()
    engine.run_sinks(session.check(Source(src.replace('"out/s.jsonl"', '"out/s2.jsonl"'), "t.alg")).sinks, session.options)
    assert len(collections) == 2 and all(r() is None for r in refs)


def test_a_held_cache_is_found_by_its_prefixes_not_by_where_it_was_planned(rms):
    """Two groups of one model (two text formats) each plan their own blocks: a block of
    the second whose prefixes differ is computed afresh, whatever block the first held."""
    from transformers import AutoModelForSequenceClassification

    from algebra.reward import models

    model = AutoModelForSequenceClassification.from_pretrained(rms["rm-helpful"]).eval()
    cpu, held = torch.device("cpu"), {}
    a, b = list(range(10, 10 + batching.MIN_PREFIX)), list(range(30, 30 + batching.MIN_PREFIX))
    got = []
    for head in (a, b):
        rows = [head + [40, 41], head + [42]]
        [(part, pre, of)] = batching.prefix_batches(rows, [len(r) - 1 for r in rows])
        got.append((models.score_batch(model, [rows[i] for i in part], 0, cpu, (pre, of), held),
                    models.score_batch(model, [rows[i] for i in part], 0, cpu)))
    for shared, plain in got:
        assert shared == pytest.approx(plain, abs=1e-5)
    assert got[0][1] != pytest.approx(got[1][1], abs=1e-3)  # the heads do change the scores


# ---- the last layer's position-wise tail at the scored positions only (models._tail) ----------


def _tiny(kind: str):
    """A random float64 sequence-classification model of a transformers architecture."""
    import transformers

    torch.manual_seed(0)
    size = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, num_labels=1,
                pad_token_id=0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_head=4, n_layer=2, num_labels=1, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
        return transformers.GPT2ForSequenceClassification(cfg).double().eval()
    cfg = getattr(transformers, f"{kind}Config")(intermediate_size=48, num_key_value_heads=2, **size)
    return getattr(transformers, f"{kind}ForSequenceClassification")(cfg).double().eval()


def _alone(model, rows):
    """Each row alone, unpadded: transformers' plain forward pass."""
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in rows]


def _mlp_inputs(model):
    """Record the shapes the last decoder layer's MLP is called with."""
    seen: list[tuple[int, ...]] = []
    mlp = model.base_model.layers[-1].mlp
    return seen, mlp.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))


@pytest.mark.parametrize("kind", ["Llama", "Qwen2", "Qwen3", "Mistral"])
def test_the_last_layers_tail_runs_at_the_scored_positions_only_and_scores_as_each_row_alone(kind):
    """A decoder whose last layer is attention then position-wise modules, under transformers'
    last-non-padding pooling: the last layer's output projection and MLP run only at each
    row's scored position (its last non-padding token; a padding id inside a row is not
    its end), every other layer everywhere, and each score equals the row alone in float64."""
    from algebra.reward import models

    model = _tiny(kind)
    mlp, o_proj = model.base_model.layers[-1].mlp, model.base_model.layers[-1].self_attn.o_proj
    rows = [[5, 6, 7, 8, 9, 10, 11], [5, 0, 7], [12, 13, 14, 15, 16], [9]]
    seen, hook = _mlp_inputs(model)
    got = models.score_batch(model, rows, 0, torch.device("cpu"))
    hook.remove()
    assert seen == [(1, len(rows), 32)]  # one position per row, not the padded 4 x 7
    assert model.base_model.layers[-1].mlp is mlp and model.base_model.layers[-1].self_attn.o_proj is o_proj
    assert got == pytest.approx(_alone(model, rows), abs=1e-12)


def test_the_tail_is_skipped_in_a_blocks_prefix_pass_and_its_cache_is_unchanged(rms):
    """A block's prefix pass reads no position's last-layer output: the last MLP is not run,
    and every layer's keys and values are those of the plain forward pass."""
    from transformers import AutoModelForSequenceClassification

    from algebra.reward import models

    model = AutoModelForSequenceClassification.from_pretrained(rms["rm-helpful"], dtype=torch.float64).eval()
    head = list(range(10, 10 + batching.MIN_PREFIX))
    pre = batching.Prefixes((tuple(head), tuple(head[:-3] + [3, 4, 5, 6])))
    seen, hook = _mlp_inputs(model)
    cache, lens = models.block_cache(model, pre, 0, torch.device("cpu"), None)
    hook.remove()
    assert seen == [] and lens == [16, 17]
    ids = torch.tensor([head + [0], head[:-3] + [3, 4, 5, 6]])
    with torch.no_grad():
        plain = model.base_model(input_ids=ids, attention_mask=(torch.arange(17) < torch.tensor([[16], [17]])).long(),
                                 use_cache=True).past_key_values
    for mine, theirs in zip(cache.layers, plain.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    rows = [head + [40, 41], list(pre.ids[1]) + [42]]
    seen, hook = _mlp_inputs(model)
    got = models.score_batch(model, rows, 0, torch.device("cpu"), (pre, [0, 1]), {})
    hook.remove()
    assert seen == [(1, 2, 64)]  # the rows' own tokens after the cache: the tail at one each
    assert got == pytest.approx(_alone(model, rows), abs=1e-12)


def test_the_tail_is_left_whole_where_the_head_or_the_layers_differ(rms):
    """GPT-2 (its own head and layers), a Llama under another head (the encoder-style
    wrapper), and a Llama without a pad_token_id: the last MLP runs at every position and
    scores are the plain forward pass's."""
    from transformers import AutoModelForSequenceClassification

    from algebra.reward import models

    gpt2 = _tiny("gpt2")
    assert models._tail(gpt2) is None
    rows = [[5, 6, 7, 8], [9, 10]]
    assert models.score_batch(gpt2, rows, 0, torch.device("cpu")) == pytest.approx(_alone(gpt2, rows), abs=1e-12)
    llama = AutoModelForSequenceClassification.from_pretrained(rms["rm-helpful"], dtype=torch.float64).eval()
    wrapped = _encoder(llama)
    assert models._tail(wrapped) is not None and models._pooled_at(wrapped, torch.tensor(rows[:1])) is None
    seen, hook = _mlp_inputs(llama)
    got = models.score_batch(wrapped, rows, 0, torch.device("cpu"))
    assert seen == [(2, 4, 64)]
    assert got == pytest.approx(_alone(llama, rows), abs=1e-12)
    llama.config.pad_token_id = None
    seen.clear()
    got = models.score_batch(llama, rows[:1], 0, torch.device("cpu"))
    hook.remove()
    assert seen == [(1, 4, 64)]
    assert got == pytest.approx(_alone(llama, rows[:1]), abs=1e-12)
