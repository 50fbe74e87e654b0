"""align(): vocabulary alignment, the Rows gather, the output tokenizer, and the errors
for arithmetic on unaligned vocabularies.

References are built here from the tokenizers' own vocab dicts (transformers'
`get_vocab()`, not alg's reader) and the stored rows, in float64, by the rule: a model's
own row if it has the token, else the base's row, else the mean of the models that have it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st

from algebra import AlgError, api
from algebra.execute import Evaluator
from algebra.io.checkpoint import MemorySource
from algebra.io.tokenizer import read_vocab
from algebra.lower import Leaf, Rows
from algebra.plan import buffers
from algebra.types import TensorSpec

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
NEW_TOKENS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def fams(tmp_path_factory) -> dict[str, Path]:
    """a, a2: tokenizer A (320 tokens); b1, b2: tokenizer B (320 tokens, another corpus);
    rm: a reward model (no lm_head, a score head) with tokenizer B; c: a's tokenizer plus
    two chat tokens, embeddings resized to 322 rows."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from algebra.tiny import OTHER_CORPUS, build_family

    root = tmp_path_factory.mktemp("vocab")
    a = build_family(root / "a", names=("a", "a2"))
    b = build_family(root / "b", names=("b1", "b2", "rm"), corpus=OTHER_CORPUS, seed=1)
    tok = AutoTokenizer.from_pretrained(a["a"])
    tok.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    model = LlamaForCausalLM.from_pretrained(a["a"])
    torch.manual_seed(3)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[-2:] = torch.randn(2, model.config.hidden_size)
        model.lm_head.weight[-2:] = torch.randn(2, model.config.hidden_size)
    model.config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(root / "c")
    tok.save_pretrained(root / "c")
    return {**a, **b, "c": root / "c"}


def _interp(base: Path, **kw):
    return quiet_interpreter(base, **kw)


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _rows(folder: Path) -> dict[str, np.ndarray]:
    from conftest import read_folder

    return {n: t.double().numpy() for n, t in read_folder(folder).items()}


def _aligned(fams, ms: str, tmp_path: Path, **kw) -> list:
    """Check `align(...)` and compute every aligned model (float64 compute)."""
    interp = _interp(tmp_path, compute_dtype="float64", **kw)
    value = interp.eval(ms.format(**{k: f'load("{v}")' for k, v in fams.items()}))
    got = [{n: t.numpy() for n, t in r.state_dict(dtype="float64").items()} for r in value]
    return [r.model for r in value], got


def _reference(models: list[str], fams, out_tokens: list[str], base: int = 0) -> list[dict[str, np.ndarray]]:
    """Each model's embedding and head remapped to out_tokens by the documented rule."""
    vocabs = [_vocab(fams[m]) for m in models]
    rows = [_rows(fams[m]) for m in models]
    out = []
    for i in range(len(models)):
        got = {}
        for name in (EMB, HEAD):
            result = []
            for tok in out_tokens:
                if tok in vocabs[i]:
                    result.append(rows[i][name][vocabs[i][tok]])
                elif tok in vocabs[base]:
                    result.append(rows[base][name][vocabs[base][tok]])
                else:
                    have = [rows[k][name][vocabs[k][tok]] for k in range(len(models)) if tok in vocabs[k]]
                    result.append(np.mean(have, axis=0))
            got[name] = np.stack(result)
        out.append(got)
    return out


def _by_id(vocab: dict[str, int]) -> list[str]:
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


# ---- reading vocabularies ------------------------------------------------------------------


def test_read_vocab_matches_transformers(fams):
    for name in ("a", "b1", "c"):
        v = read_vocab(fams[name])
        ref = _vocab(fams[name])
        assert v.index == ref and len(v) == len(ref) and v.contiguous
    assert read_vocab(fams["a"]).tokens != read_vocab(fams["b1"]).tokens


# ---- row remapping -------------------------------------------------------------------------


def test_union_order_and_rows(fams, tmp_path):
    va, vb = _vocab(fams["a"]), _vocab(fams["b1"])
    union = _by_id(va) + [t for t in _by_id(vb) if t not in va]
    assert len(union) > len(va)  # the two tokenizers really differ
    value, got = _aligned(fams, 'align([{a}, {b1}, {b2}], tokenizer="union")', tmp_path)
    ref = _reference(["a", "b1", "b2"], fams, union)
    for i, m in enumerate(value):
        assert m.type.config["vocab_size"] == len(union)
        assert m.type.tensors[EMB].shape == (len(union), 64)
        for name in (EMB, HEAD):
            np.testing.assert_allclose(got[i][name], ref[i][name], rtol=1e-12, atol=1e-12)
    # tokens only in b1 and b2 are their mean in a: the mean rule really ran
    j = len(va)
    np.testing.assert_allclose(got[0][EMB][j], (_rows(fams["b1"])[EMB][vb[union[j]]] +
                                                _rows(fams["b2"])[EMB][vb[union[j]]]) / 2, rtol=1e-12)
    # every other tensor is untouched
    src = _rows(fams["b1"])
    for name, t in got[1].items():
        if name not in (EMB, HEAD):
            assert np.array_equal(t, src[name])


def test_base_mode_rows_and_identity(fams, tmp_path):
    vb = _vocab(fams["b1"])
    value, got = _aligned(fams, 'align([{b1}, {a}], tokenizer="base")', tmp_path)
    ref = _reference(["b1", "a"], fams, _by_id(vb))
    for i in range(2):
        for name in (EMB, HEAD):
            np.testing.assert_allclose(got[i][name], ref[i][name], rtol=1e-12, atol=1e-12)
    # the base's own table is unchanged and lowers to its stored tensor: nothing gathered
    assert value[0].type.tensors[EMB].shape == (len(vb), 64)
    assert isinstance(api.lower(value[0])[EMB], Leaf)
    assert value[0].type.tokenizer is None and value[1].type.tokenizer.folder == fams["b1"]


def test_same_tokenizer_is_a_no_op(fams, tmp_path):
    value = _interp(tmp_path).eval(f'align([load("{fams["a"]}"), load("{fams["a2"]}")], tokenizer="union")')
    exprs = api.lower(value[1].model)
    assert isinstance(exprs[EMB], Leaf) and exprs[EMB].source.path == fams["a2"]


def test_tokenizer_model_and_padding(fams, tmp_path):
    """tokenizer=c: c's 322 tokens; a lacks the two chat tokens and takes the base's row,
    here c's (base=c); in a's own order the ids of shared tokens are unchanged."""
    vc = _vocab(fams["c"])
    value, got = _aligned(fams, 'align([{a}, {c}], tokenizer={c}, base={c})', tmp_path)
    ref = _reference(["a", "c"], fams, _by_id(vc), base=1)
    for name in (EMB, HEAD):
        np.testing.assert_allclose(got[0][name], ref[0][name], rtol=1e-12, atol=1e-12)
    # config token ids follow the output vocabulary: c's eos is <|im_end|>; a keeps </s>
    assert value[0].type.config["eos_token_id"] == vc["</s>"]
    assert value[1].type.config["eos_token_id"] == vc["<|im_end|>"]


def test_chunked_gather_matches_one_chunk(fams, tmp_path):
    """Chunks that cut runs mid-row give the same bits as one chunk per tensor."""
    _, small = _aligned(fams, 'align([{a}, {b1}, {b2}], tokenizer="union")', tmp_path, chunk_elems=100)
    _, whole = _aligned(fams, 'align([{a}, {b1}, {b2}], tokenizer="union")', tmp_path)
    for s, w in zip(small, whole, strict=True):
        for name in (EMB, HEAD):
            assert np.array_equal(s[name], w[name])


# ---- saving ---------------------------------------------------------------------------------


def test_saved_union_reloads_with_its_tokenizer(fams, tmp_path, read):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = f"""
        ms = align([load("{fams["a"]}"), load("{fams["b1"]}")], tokenizer="union")
        save(fold(lambda x, y: x, ms), "out/a")
        save(fold(lambda x, y: y, ms), "out/b")
        save(ema(ms, 0.5), "out/mix")
    """
    _interp(tmp_path).eval(recipe)
    va, vb = _vocab(fams["a"]), _vocab(fams["b1"])
    union = _by_id(va) + [t for t in _by_id(vb) if t not in va]
    ra, rb = _rows(fams["a"]), _rows(fams["b1"])
    for which in ("a", "b", "mix"):
        out = tmp_path / "out" / which
        tok = AutoTokenizer.from_pretrained(out)
        config = json.loads((out / "config.json").read_text())
        tensors = read(out)
        assert len(tok) == config["vocab_size"] == tensors[EMB].shape[0] == len(union)
        assert tok.get_vocab() == {t: j for j, t in enumerate(union)}
        # shared tokens keep their rows, under the output ids
        for t in ("Ġthe", "<s>", "The"):
            if t in va and t in vb:
                j = tok.convert_tokens_to_ids(t)
                want = {"a": ra[EMB][va[t]], "b": rb[EMB][vb[t]],
                        "mix": 0.5 * ra[EMB][va[t]] + 0.5 * rb[EMB][vb[t]]}[which]
                np.testing.assert_allclose(tensors[EMB][j].double().numpy(), want, rtol=1e-6, atol=1e-7)
        model = AutoModelForCausalLM.from_pretrained(out)
        ids = tok(["Zebras graze quietly.", "What is 12 plus 30?"], return_tensors="pt", padding=True)
        new_id = torch.tensor([[len(va), len(union) - 1]])  # tokens only b1's tokenizer has
        with torch.no_grad():
            logits = model(**ids).logits
            assert logits.shape[-1] == len(union) and torch.isfinite(logits).all()
            assert torch.isfinite(model(new_id).logits).all()


def test_saved_base_mode_keeps_base_files(fams, tmp_path):
    _interp(tmp_path).eval(
        f'save(fold(lambda x, y: y, align([load("{fams["b1"]}"), load("{fams["a"]}")])), "out")')
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (fams["b1"] / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 320
    assert "align to the vocabulary of" in (out / "README.md").read_text()


def test_dogerm_across_tokenizers(fams, tmp_path, read):
    """A reward model and an LM with different tokenizers: align, then DogeRM's merge.
    The LM's head rows for tokens only the reward model has are zeros (no model with an
    lm_head has them), with a warning; merge drops that head anyway."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    interp = _interp(tmp_path)
    interp.eval(f'save(fold(lambda rm, lm: merge(rm, lm, 0.3), '
                f'align([load("{fams["rm"]}"), load("{fams["a"]}")], tokenizer="union")), "out")')
    assert any("are zeros" in w.message and "lm_head.weight" in w.message for w in interp.warnings)
    assert not any("rows in rm" in w.message for w in interp.warnings)  # no partial-row merge
    vr, va = _vocab(fams["rm"]), _vocab(fams["a"])
    union = _by_id(vr) + [t for t in _by_id(va) if t not in vr]
    out = tmp_path / "out"
    tok = AutoTokenizer.from_pretrained(out)
    got = read(out)
    assert len(tok) == got[EMB].shape[0] == len(union) and HEAD not in got
    rm, lm = _rows(fams["rm"]), _rows(fams["a"])
    for j, t in enumerate(union):
        r = rm[EMB][vr[t]] if t in vr else lm[EMB][va[t]]  # rm is the base
        m = lm[EMB][va[t]] if t in va else rm[EMB][vr[t]]
        np.testing.assert_allclose(got[EMB][j].double().numpy(), 0.7 * r + 0.3 * m, rtol=1e-5, atol=1e-6)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(**tok(["Zebras graze."], return_tensors="pt")).logits).all()


# ---- errors ---------------------------------------------------------------------------------


def test_unaligned_arithmetic_is_an_error(fams, tmp_path):
    # same shapes, different tokens: no silent row mixing
    with pytest.raises(AlgError) as e:
        _interp(tmp_path).eval(f'load("{fams["a"]}") + load("{fams["b1"]}")')
    text = e.value.format()
    assert "different vocabularies" in text and 'align([a, b], tokenizer="union")' in text
    # different row counts: the shape error says how to fix it
    with pytest.raises(AlgError) as e:
        _interp(tmp_path).eval(f'0.5 * load("{fams["a"]}") + 0.5 * load("{fams["c"]}")')
    assert "320 vs 322 tokens" in e.value.format() and "align([a, b]" in e.value.format()
    # one vocabulary extending the other (c is a plus two tokens) is not a conflict...
    # ...and after align the same arithmetic checks
    _interp(tmp_path).eval(f'ema(align([load("{fams["a"]}"), load("{fams["c"]}")], tokenizer="union"), 0.5)')


def test_argument_errors(fams, tmp_path):
    interp = _interp(tmp_path)
    with pytest.raises(AlgError, match="did you mean 'union'"):
        interp.eval(f'align([load("{fams["a"]}")], tokenizer="unoin")')
    with pytest.raises(AlgError, match="no tokenizer files"):
        interp.eval(f'align([load("{fams["a"]}"), load("{fams["b1"] / "model.safetensors"}")])')
    # a vocabulary no input model has rows for
    with pytest.raises(AlgError, match="in none of the models"):
        interp.eval(f'align([load("{fams["a"]}")], tokenizer=load("{fams["b1"]}"))')


# ---- the Rows gather on its own -------------------------------------------------------------


@st.composite
def _gathers(draw):
    n_src, row_len = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    src_rows = [draw(st.integers(1, 12)) for _ in range(n_src)]
    out_rows = draw(st.integers(1, 20))
    per_row = []
    for _ in range(out_rows):
        k = draw(st.integers(0, n_src))
        chosen = draw(st.permutations(range(n_src)))[:k]
        per_row.append(tuple((draw(st.sampled_from([1.0, 0.5, -2.0, 1 / 3])), s,
                              draw(st.integers(0, src_rows[s] - 1))) for s in chosen))
    chunk = draw(st.integers(1, 40))
    return src_rows, row_len, per_row, chunk


@settings(max_examples=60, deadline=None)
@given(_gathers())
def test_rows_eval_matches_a_direct_gather(case):
    src_rows, row_len, per_row, chunk = case
    g = torch.Generator().manual_seed(0)
    # float32 sources in float64 compute: every source read takes a pool buffer
    data = {f"s{k}": torch.randn((r, row_len), generator=g) for k, r in enumerate(src_rows)}
    mem = MemorySource(data)
    leaves = [Leaf(mem, f"s{k}", mem.tensors[f"s{k}"]) for k in range(len(src_rows))]
    # one run per row (runs of several rows are the executor's business, tested above)
    runs = tuple((j, 1, tuple((c, leaves[s], r) for c, s, r in terms)) for j, terms in enumerate(per_row))
    spec = TensorSpec((len(per_row), row_len), "F64")
    e = Rows(runs, row_len, spec)
    ev = Evaluator(torch.device("cpu"), torch.float64)
    live, peak = [0], [0]
    take, give = ev.pool.take, ev.pool.give

    def counted_take(n, dtype):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return take(n, dtype)

    def counted_give(t):  # here every value given back came from take
        live[0] -= 1
        give(t)

    ev.pool.take, ev.pool.give = counted_take, counted_give
    pieces = []
    for e0 in range(0, spec.numel, chunk):
        out = ev.eval(e, e0, min(spec.numel, e0 + chunk))
        pieces.append(out.clone())
        ev.pool.give(out)
    got = torch.cat(pieces)
    ref = np.zeros((len(per_row), row_len))
    for j, terms in enumerate(per_row):
        for c, s, r in terms:
            ref[j] += c * data[f"s{s}"][r].double().numpy()
    np.testing.assert_allclose(got.view(len(per_row), row_len).numpy(), ref, rtol=1e-12, atol=1e-12)
    # the planner's memory rule holds what the evaluator really held
    assert peak[0] <= buffers(e, 8) == (2.0 if any(per_row) else 1.0)


def test_renamed_special_tokens_warn_and_combine(fams, tmp_path):
    # a fine-tune that renamed a special token (here <pad> -> <|reserved_0|>) keeps the
    # same row slots: arithmetic warns instead of refusing, and still computes
    import json
    import shutil

    renamed = tmp_path / "renamed"
    shutil.copytree(fams["a2"], renamed)
    spec = json.loads((renamed / "tokenizer.json").read_text())
    for t in spec["added_tokens"]:
        if t["content"] == "<pad>":
            t["content"] = "<|reserved_0|>"
    vocab = spec["model"]["vocab"]
    vocab["<|reserved_0|>"] = vocab.pop("<pad>")
    (renamed / "tokenizer.json").write_text(json.dumps(spec))
    interp = _interp(tmp_path)
    out = interp.eval(f'0.5 * load("{fams["a"]}") + 0.5 * load("{renamed}")').state_dict()
    assert any("special token(s) differ" in w.message and "<|reserved_0|>" in w.message
               for w in interp.warnings)
    a, b = _rows(fams["a"]), _rows(renamed)
    np.testing.assert_allclose(out[EMB].double().numpy(), 0.5 * a[EMB] + 0.5 * b[EMB], rtol=1e-5, atol=1e-6)
    # a renamed ordinary token is still an error
    vocab2 = dict(vocab)
    plain = next(t for t in vocab2 if t.isalpha() and len(t) > 2)
    vocab2["zzz" + plain] = vocab2.pop(plain)
    spec["model"]["vocab"] = vocab2
    (renamed / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(AlgError, match="different vocabularies"):
        _interp(tmp_path).eval(f'load("{fams["a"]}") + load("{renamed}")')


METHODS_WITH_TOKENIZER = {
    # method call with the models written as {a} and {b}; the base is the first model
    "model_stock": "model_stock({a}, [{b}, {b2}]{opt})",
    "nuslerp": "nuslerp({a}, {b}, 0.3{opt})",
    "multislerp": "multislerp([{a}, {b}], [0.4, 0.6]{opt})",
    "karcher": "karcher([{a}, {b}]{opt})",
    "nearswap": "nearswap({a}, {b}, 0.01{opt})",
    "ram": "ram({a}, [{b}, {b2}]{opt})",
    "ramplus_tl": "ramplus_tl({a}, [{b}, {b2}]{opt})",
    "merge": "merge({a}, {b}, 0.3{opt})",
    "linear": "linear([{a}, {b}], [1, 2]{opt})",
    "task_arithmetic": "task_arithmetic({a}, [{b}, {b2}], 0.5{opt})",
    "ties": "ties({a}, [{b}, {b2}], 1, 0.5{opt})",
    "dare_ties": "dare_ties({a}, [{b}, {b2}], 1, 0.5{opt})",
    "breadcrumbs": "breadcrumbs({a}, [{b}, {b2}], 1, 0.5{opt})",
    "della": "della({a}, [{b}, {b2}], 1, 0.5{opt})",
    "sce": "sce({a}, [{b}, {b2}], 0.5{opt})",
    "slerp": "slerp({a}, {b}, 0.3{opt})",
    "slerp_tv": "slerp([{b}, {b2}], base={a}{opt})",
}


@pytest.mark.parametrize("method", sorted(METHODS_WITH_TOKENIZER))
def test_tokenizer_option_of_merge_methods_is_align_first(fams, tmp_path, method):
    """`tokenizer=` on a merge method means: align base and models into that vocabulary,
    then merge. Without it, models with different tokenizers are refused."""
    a, b, b2 = (f'load("{fams[k]}")' for k in ("a", "b1", "b2"))
    text = METHODS_WITH_TOKENIZER[method]
    option = text.format(a=a, b=b, b2=b2, opt=', tokenizer="union"')
    used = [a, b, b2] if "{b2}" in text else [a, b]  # align exactly the models merged
    explicit = (f'ab = align([{", ".join(used)}], tokenizer="union")\n'
                + text.format(a="ab[0]", b="ab[1]", b2="ab[2]", opt=""))
    got = _interp(tmp_path).eval(option).state_dict()
    want = _interp(tmp_path).eval(explicit).state_dict()
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert got[EMB].shape[0] > len(_vocab(fams["a"]))  # the union is larger than a's vocabulary
    with pytest.raises(AlgError, match="vocabular"):
        _interp(tmp_path).eval(text.format(a=a, b=b, b2=b2, opt=""))


def test_merge_methods_declare_the_one_tokenizer_parameter():
    """Every builtin with a `tokenizer=` option (align's own argument aside) declares it
    by the shared TOKENIZER_PARAM, as its last parameter."""
    import algebra.check  # noqa: F401 (every builtin family registered)
    from algebra.methods.common import TOKENIZER_PARAM
    from algebra.registry import REGISTRY

    BUILTINS = REGISTRY.builtins

    users = {n: b for n, b in BUILTINS.items() if n != "align" and any(p.name == "tokenizer" for p in b.params)}
    assert {"merge", "slerp", "linear", "ties", "dare_ties", "model_stock", "nuslerp", "karcher"} <= set(users)
    for name, b in users.items():
        assert b.signature().endswith(f", {TOKENIZER_PARAM})"), name
