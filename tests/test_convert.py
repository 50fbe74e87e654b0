"""`alg convert mergekit`: mergekit YAML configs in, alg recipes out.

- Golden files: each tests/mergekit/NAME.yml converts to tests/golden/convert/NAME.alg,
  and each tests/mergekit/errors/NAME.yml fails with tests/golden/convert/errors/NAME.err
  (set ALG_UPDATE_GOLDEN=1 to rewrite them, then review the diff).
- Every converted recipe parses; the CLI writes the same text (stdout or -o) and uses the
  exit statuses of the other commands.
- mergekit's parameter lookup (levels, filters, gradients) is checked against a reference
  written here from mergekit's rules, on random settings (hypothesis): the alg expression
  the converter writes, evaluated for a tensor name and depth, equals mergekit's value.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from algebra import ast
from algebra.cli import main
from algebra.convert import ConvertError, mergekit_to_alg
from algebra.convert._yaml import Y, documents
from algebra.convert.mergekit import DTYPES, FUNCTIONS, KEYWORDS, P, _Converter
from algebra.parser import parse, parse_expr
from algebra.source import Source

HERE = Path(__file__).parent
CONFIGS = sorted((HERE / "mergekit").glob("*.yml"))
ERRORS = sorted((HERE / "mergekit" / "errors").glob("*.yml"))
GOLDEN = HERE / "golden" / "convert"
UPDATE = bool(os.environ.get("ALG_UPDATE_GOLDEN"))


def _convert(path: Path, **kw) -> str:
    return mergekit_to_alg(path.read_text(), name=path.name, **kw)


# ---- golden files ----------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_golden(config):
    text = _convert(config)
    expected = GOLDEN / f"{config.stem}.alg"
    if UPDATE:
        expected.write_text(text)
    assert text == expected.read_text()
    program = parse(text, expected.name)
    assert program.stmts  # a real recipe, not just comments
    assert 'out = "merged"' in text and re.search(r"^save\(\w+, out\b", text, re.M)


@pytest.mark.parametrize("config", ERRORS, ids=[p.stem for p in ERRORS])
def test_error_golden(config):
    with pytest.raises(ConvertError) as info:
        _convert(config)
    err = info.value.format() + "\n"
    expected = GOLDEN / "errors" / f"{config.stem}.err"
    if UPDATE:
        expected.parent.mkdir(exist_ok=True)
        expected.write_text(err)
    assert err == expected.read_text()
    # positioned: file:line:col, the config's own line, a caret under the culprit
    first, line, caret = err.splitlines()[:3]
    m = re.match(rf"^{re.escape(config.name)}:(\d+):(\d+): error: ", first)
    assert m, first
    lineno, col = int(m[1]), int(m[2])
    assert line.strip() == config.read_text().splitlines()[lineno - 1].strip()
    assert set(caret.strip()) == {"^"} and caret.index("^") == 4 + col - 1


# ---- what the recipes say -------------------------------------------------------------


def _calls(text: str) -> dict[str, ast.Node]:
    """Top-level name -> expression of a converted recipe."""
    return {s.name: s.value for s in parse(text).stmts if isinstance(s, ast.Assign)}


def test_model_paths_rewrite_loads_and_keep_the_reference():
    cfg = HERE / "mergekit" / "dare_ties.yml"
    text = _convert(cfg, model_paths={"mistralai/Mistral-7B-v0.1": "/models/mistral"})
    assert 'mistral_7b_v0_1 = load("/models/mistral")  # base_model, mistralai/Mistral-7B-v0.1' in text
    assert 'load("samir-fama/SamirGPT-v1")' in text


def test_every_model_loads_once_and_mega_documents_chain():
    text = _convert(HERE / "mergekit" / "mega.yml")
    loads = re.findall(r'load\("([^"]+)"\)', text)
    assert len(loads) == len(set(loads)) == 4
    # the second document merges the first one's result, not a folder on disk
    assert "./models/gradient-slerp" not in loads
    assert re.search(r"gradient_slerp = slerp\(", text)
    assert re.search(r"ties\(\s*llama_2_13b_fp16,\s*\[gradient_slerp, wizardmath", text)


def test_normalize_true_on_a_linear_method_divides_the_weights():
    text = _convert(HERE / "mergekit" / "breadcrumbs.yml")
    weights = _calls(text)["weights"]
    values = [0.6 / 1.5, 0.9 / 1.5]
    assert [_eval(item, "x", 0.0) for item in weights.items] == values


def test_nuslerp_weights_become_t():
    text = mergekit_to_alg(
        "models:\n  - model: a/one\n    parameters: {weight: 1.0}\n"
        "  - model: a/two\n    parameters: {weight: 3.0}\nmerge_method: nuslerp\n"
    )
    assert "nuslerp(one, two, 0.75)" in text


def test_names_never_shadow_keywords_builtins_or_library():
    from algebra.registry import REGISTRY
    from algebra.resources import stdlib_dir

    prelude = (stdlib_dir() / "prelude.alg").read_text()
    library = set(re.findall(r"^def (\w+)", prelude, re.M))
    shipped = set(REGISTRY.builtins)
    assert shipped | library <= set(FUNCTIONS)
    from algebra.parser import _KEYWORDS

    assert set(_KEYWORDS) == set(KEYWORDS)
    text = mergekit_to_alg(
        "models:\n  - model: org/ties\n    parameters: {weight: 1}\n"
        "  - model: org/load\n    parameters: {weight: 1}\n  - model: x/true\n"
        "    parameters: {weight: 1}\nmerge_method: linear\n"
    )
    assert "ties_2 = load" in text and "load_2 = load" in text and "true_2 = load" in text
    parse(text)


def test_signatures_read_without_torch_equal_the_registry():
    """convert/signatures.py reads the @builtin headers from source; the imported registry
    is the truth it must equal (names, parameters, defaults)."""
    from algebra.convert.signatures import builtin_signatures
    from algebra.registry import REGISTRY

    sigs = builtin_signatures()
    shipped = REGISTRY.builtins
    assert set(sigs) == set(shipped)
    for name, b in shipped.items():
        assert sigs[name].params == tuple(p.name for p in b.params), name
        assert sigs[name].defaults == b.defaults, name
        assert sigs[name].types == {p.name: str(p.type) for p in b.params if p.type is not None}, name


def test_every_keyword_the_converter_writes_exists():
    """A MkParam's keyword is a parameter of alg's function (else the converter would
    refuse a setting alg supports, or write a call that does not check)."""
    from algebra.convert.mergekit import METHODS
    from algebra.convert.signatures import signature
    from algebra.methods.sparse import METHODS as SPARSE

    for mname, m in METHODS.items():
        if m.base == "passthrough":  # stack(layers(...)), no function of its own
            continue
        sig = signature(m.func)
        for p, spec in m.params.items():
            if spec.keyword is not None and not (p == "normalize" and mname in (
                    "task_arithmetic", "dare_linear", "breadcrumbs", "della_linear")):
                # (those four have no normalize=: the converter divides the weights)
                assert sig.has(spec.keyword), (mname, p, spec.keyword)
        # alg's DARE and DELLA rescale what they drop, the others never do
        assert m.rescales == (SPARSE.get(m.func, ("none",))[0] in ("dare", "della")), mname


def _keyword_value(text: str, func: str, keyword: str):
    """The value a converted recipe passes for `keyword` to `func`, or alg's default."""
    from algebra.convert.signatures import signature

    for stmt in parse(text).stmts:
        v = getattr(stmt, "value", None)
        if isinstance(v, ast.Call) and getattr(v.func, "id", None) == func:
            for k in v.kwargs:
                if k.name == keyword:
                    return ast.literal_value(k.value)
            return signature(func).default(keyword)
    raise AssertionError(f"no {func}() call in\n{text}")


_GTA_YAML = ("models:\n  - model: a/base\n  - model: a/one\n    parameters: {{weight: 0.5, density: 1.0}}\n"
             "  - model: a/two\n    parameters: {{weight: 0.3, density: 1.0}}\n"
             "merge_method: {method}\nbase_model: a/base\n{params}")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
@pytest.mark.parametrize("setting", [None, True, False])
def test_normalize_is_mergekits_default_or_as_written(method, setting):
    """Issue 8: dare_ties/breadcrumbs_ties default to normalize: false in mergekit, and an
    explicit normalize: is honoured both ways, never refused."""
    mk_default = {"ties": True, "dare_ties": False, "breadcrumbs_ties": False, "della": True}[method]
    params = "" if setting is None else f"parameters:\n  normalize: {str(setting).lower()}\n"
    if method == "della":
        params = (params or "parameters:\n") + "  epsilon: 0.0\n"
    text = mergekit_to_alg(_GTA_YAML.format(method=method, params=params))
    want = mk_default if setting is None else setting
    assert _keyword_value(text, method, "normalize") is want


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"])
@pytest.mark.parametrize("setting", [True, False])
def test_normalize_without_a_keyword_divides_the_weights(method, setting):
    """alg's function has no normalize=: true divides plain-number weights by their sum."""
    eps = "  epsilon: 0.0\n" if method == "della_linear" else ""
    text = mergekit_to_alg(_GTA_YAML.format(
        method=method, params=f"parameters:\n  normalize: {str(setting).lower()}\n{eps}"))
    weights = [_eval(item, "x", 0.0) for item in _calls(text)["weights"].items]
    assert weights == pytest.approx([0.5 / 0.8, 0.3 / 0.8] if setting else [0.5, 0.3])


def test_nuslerp_flatten_and_row_wise_and_multislerp_normalize_weights():
    two = ("models:\n  - model: a/one\n    parameters: {weight: 1.0}\n"
           "  - model: a/two\n    parameters: {weight: 3.0}\n")
    text = mergekit_to_alg(two + "merge_method: nuslerp\nparameters: {nuslerp_flatten: false}\n")
    assert "nuslerp(one, two, 0.75, flatten=false)" in text
    text = mergekit_to_alg(two + "merge_method: nuslerp\n"
                           "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n")
    assert "nuslerp(one, two, 0.75, flatten=false, row_wise=true)" in text
    # row_wise without flatten: false is ignored by mergekit, so it must not reach alg
    text = mergekit_to_alg(two + "merge_method: nuslerp\nparameters: {nuslerp_row_wise: true}\n")
    assert "nuslerp(one, two, 0.75)" in text and "ignores nuslerp_row_wise" in text
    text = mergekit_to_alg(two + "merge_method: multislerp\nparameters: {normalize_weights: false}\n")
    assert _keyword_value(text, "multislerp", "normalize") is False


def test_gradients_follow_mergekits_rule():
    """Issue 8: mergekit evaluates everything outside the layer stack (the head and final
    norm too) at t=0 and a one-layer slice at t=1; alg's own ramp keeps its rule."""
    from algebra.arch import Arch
    from algebra.schedule import Ramp

    class FakeArch(Arch):
        def __init__(self, n):
            object.__setattr__(self, "n_layers", n)
            object.__setattr__(self, "layer_of", {f"model.layers.{i}.mlp.w": i for i in range(n)})

        def depth(self, name):
            i = self.layer_of.get(name)
            if i is not None:
                return i / (self.n_layers - 1) if self.n_layers > 1 else 0.0
            return 0.0 if "embed" in name else 1.0

    mk, own = Ramp((0.2, 0.6, 1.0), "mergekit"), Ramp((0.2, 0.6, 1.0))
    a5 = FakeArch(5)
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert mk.at(name, a5) == 0.2
    assert own.at("lm_head.weight", a5) == 1.0 and own.at("model.embed_tokens.weight", a5) == 0.2
    for i in range(5):
        t = i / 4
        want = 0.2 + t * 2 * 0.4 if t <= 0.5 else 0.6 + (t - 0.5) * 2 * 0.4
        assert mk.at(f"model.layers.{i}.mlp.w", a5) == pytest.approx(want)
        assert own.at(f"model.layers.{i}.mlp.w", a5) == pytest.approx(want)
    assert mk.at("model.layers.0.mlp.w", FakeArch(1)) == 1.0
    assert own.at("model.layers.0.mlp.w", FakeArch(1)) == 0.2
    assert repr(mk) == 'ramp(0.2, 0.6, 1, rule="mergekit")'
    text = mergekit_to_alg(_GTA_YAML.format(method="ties", params="").replace(
        "weight: 0.5", "weight: [0.5, 1]"))
    assert 'ramp(0.5, 1, rule="mergekit")' in text


def test_ramp_rule_is_checked():
    from algebra.errors import AlgTypeError
    from algebra.interpreter import Interpreter

    with pytest.raises(AlgTypeError, match="rule must be one of 'alg', 'mergekit'"):
        Interpreter().eval('ramp(0, 1, rule="mergekt")')


MERGEKIT_PYTHON = Path(os.environ.get("MERGEKIT_PYTHON", "/work/venvs/mergekit/bin/python"))


@pytest.mark.skipif(not MERGEKIT_PYTHON.exists(), reason="no mergekit venv (set MERGEKIT_PYTHON)")
def test_method_table_matches_the_installed_mergekit():
    """The converter's copy of mergekit's methods (parameters, defaults, scopes) equals
    the registry of a real mergekit, when one is installed in a venv of its own."""
    import json

    from algebra.convert.mergekit import METHODS, REQUIRED, UNSUPPORTED_METHODS

    code = (
        "import json\nfrom mergekit.merge_methods.registry import registered_methods\n"
        "from mergekit.merge_methods.base import MISSING, ParameterScope\nout = {}\n"
        "for m in registered_methods():\n"
        "    out[m.spec.name] = {p.name: [None if p.default is MISSING else p.default, "
        "p.scope == ParameterScope.SHARED] for p in m.spec.parameters}\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run([str(MERGEKIT_PYTHON), "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    real = json.loads(run.stdout.strip().splitlines()[-1])
    # every method of mergekit's is translated or refused by name
    assert set(real) == set(METHODS) | set(UNSUPPORTED_METHODS)
    for name, m in METHODS.items():
        assert name in real, name
        ours = {p: [None if s.default is REQUIRED else s.default, s.shared] for p, s in m.params.items()}
        assert ours == real[name], name


def test_dtypes_are_the_ones_save_accepts():
    from algebra.types import DTYPE_ALIASES

    assert set(DTYPES) == set(DTYPE_ALIASES)


def test_convert_imports_no_torch():
    code = ("import sys; from algebra.convert import mergekit_to_alg; "
            "mergekit_to_alg(open(sys.argv[1]).read()); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(CONFIGS[0])], check=True,
                   env={**os.environ, "PYTHONPATH": str(HERE.parent)})


# ---- the CLI --------------------------------------------------------------------------


def test_cli_round_trip(tmp_path, capsys):
    cfg = HERE / "mergekit" / "slerp_gradient.yml"
    assert main(["convert", "mergekit", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out == mergekit_to_alg(cfg.read_text(), name=str(cfg))
    target = tmp_path / "slerp.alg"
    assert main(["convert", "mergekit", str(cfg), "-o", str(target)]) == 0
    assert target.read_text() == out
    parse(target.read_text())


def test_cli_subprocess_and_exit_statuses(tmp_path):
    cfg = HERE / "mergekit" / "ties_gradient.yml"
    run = subprocess.run([sys.executable, "-m", "algebra", "convert", "mergekit", str(cfg)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert run.returncode == 0, run.stderr
    assert run.stdout == _convert(cfg)
    bad = HERE / "mergekit" / "errors" / "lora_two.yml"
    run = subprocess.run([sys.executable, "-m", "algebra", "convert", "mergekit", str(bad)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith(f"{bad}:2:12: error: ") and "Traceback" not in run.stderr


def test_cli_usage_errors(capsys):
    assert main(["convert", "mergekit", "no/such.yml"]) == 2
    assert "no such config file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["convert", "axolotl", str(CONFIGS[0])])
    assert e.value.code == 2


# ---- mergekit's parameter semantics, against a reference --------------------------------


def _mergekit_setting(setting, name: str, t: float):
    """mergekit's evaluate_setting, written from its documented rules."""
    if isinstance(setting, int | float):
        return setting
    if isinstance(setting, list) and all(isinstance(v, int | float) for v in setting):
        x = t * (len(setting) - 1)
        i0 = int(x)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (x - i0)) * setting[i0] + (x - i0) * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in name:
            return _mergekit_setting(cond["value"], name, t)
    return None


def _mergekit_lookup(levels, name: str, t: float, default):
    for lv in levels:
        if lv is not None:
            v = _mergekit_setting(lv, name, t)
            if v is not None:
                return v
    return default


def _eval(node: ast.Node, name: str, t: float) -> float:
    """The converter's output language: numbers, ramp(v0, ..., vk) at depth t (mergekit's
    interpolation), where(pattern, x, y) by regex search on the tensor name."""
    if isinstance(node, ast.Num):
        return node.value
    if isinstance(node, ast.UnaryOp) and node.op == "-":
        return -_eval(node.operand, name, t)
    if isinstance(node, ast.BinOp) and node.op == "/":
        return _eval(node.left, name, t) / _eval(node.right, name, t)
    assert isinstance(node, ast.Call), node
    fn = node.func.id
    args = node.args
    if fn == "ramp":
        vals = [_eval(a, name, t) for a in args]
        return _mergekit_setting(vals, name, t)
    assert fn == "where", fn
    return _eval(args[1] if re.search(args[0].value, name) else args[2], name, t)


_NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight",
          "model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.o_proj.bias",
          "model.norm.weight", "h.2.attn.c_attn.weight", "a+b.mlp(x)"]
_FILTERS = ["self_attn", "mlp", "lm_head", "embed", "layers.1.", "q_proj", "*", "+b.mlp(", "norm"]
_num = st.sampled_from([0, 0.25, 0.5, 1, 1.5, -0.5, 0.3])
_scalar_or_gradient = st.one_of(_num, st.lists(_num, min_size=1, max_size=4))
_cond = st.fixed_dictionaries({"value": _scalar_or_gradient},
                              optional={"filter": st.sampled_from(_FILTERS)})
_setting = st.one_of(_scalar_or_gradient, st.lists(_cond, min_size=1, max_size=4))


def _yaml(v) -> str:
    import json

    return json.dumps(v)  # JSON is YAML


@settings(max_examples=200, deadline=None)
@given(levels=st.lists(st.one_of(st.none(), _setting), min_size=1, max_size=3),
       default=st.one_of(st.none(), _num))
def test_lookup_matches_mergekit(levels, default):
    src = Source("\n".join(f"l{i}: {_yaml(lv)}" for i, lv in enumerate(levels)), "p.yml")
    (doc,) = documents(src)
    nodes = {k: v for k, _, v in doc.items()}
    ys = [None if lv is None else nodes[f"l{i}"] for i, lv in enumerate(levels)]
    conv = _Converter(src, {})
    dflt = None if default is None else P(repr(default), default)
    complete = all(
        _mergekit_lookup(levels, n, t, default) is not None for n in _NAMES for t in (0, 0.5, 1)
    )
    try:
        p = conv.chain("w", ys, dflt, doc)
    except ConvertError:
        # refused only when some tensor would get no value, as mergekit would fail there
        assert not complete
        return
    expr = parse_expr(p.text)
    for n in _NAMES:
        for t in (0.0, 0.2, 0.5, 0.9, 1.0):
            want = _mergekit_lookup(levels, n, t, default)
            assert want is not None
            assert _eval(expr, n, t) == pytest.approx(want, abs=1e-12), (n, t, p.text)


# ---- the recipes check against real (tiny) checkpoints once the methods exist ------------


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory):
    """Models deep enough for the configs' layer ranges (40 layers), kept narrow."""
    import torch
    from safetensors.torch import load_file, save_file

    from algebra.tiny import build_family

    family = build_family(tmp_path_factory.mktemp("deep"), hidden=16, layers=40,
                          names=("base", "math", "rl1", "rl2"))
    # tiny's fine-tunes keep the base's norm weights (all ones): give them their own, so that
    # the final norm has a task vector and mergekit's gradient rule shows on it too
    for i, n in enumerate(("math", "rl1", "rl2")):
        f = family[n] / "model.safetensors"
        state = load_file(f)
        g = torch.Generator().manual_seed(100 + i)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.dim() == 1 else v
                   for k, v in state.items()}, f, metadata={"format": "pt"})
    return family


def _model_paths(config: Path, family: dict[str, Path]) -> dict[str, str]:
    """base_model -> the family's base, every other reference -> math, rl1, rl2 in turn."""
    refs: list[str] = []
    base = None
    for doc in documents(Source(config.read_text(), config.name)):
        for key, _, v in doc.items():
            if key == "base_model":
                base = v.value()
        refs += re.findall(r"model: *([^\s#]+)", doc.span.text())
    others = [r for r in dict.fromkeys(refs) if r != base]
    paths = {r: str(family[["math", "rl1", "rl2"][i % 3]]) for i, r in enumerate(others)}
    if base is not None:
        paths[base] = str(family["base"])
    return paths


# ---- every converted recipe runs, and equals mergekit's result -------------------------
#
# The reference below is written from mergekit 0.1.5's source (plan.py, config.py,
# parameter_resolver.py, merge_methods/, sparsify.py), independently of the converter: the
# plan (embeddings at t=0 from the first slice, layer j of an n-layer slice at t=j/(n-1),
# or t=1 for one layer, final norm and head at t=0 from the last slice), the parameter
# lookup (shared parameters by the output tensor's name, per-model ones by the input
# tensor's name), each method's defaults and its arithmetic, in float64. As mergekit with
# `dtype: float32` does, task vectors are taken in float32 (so that magnitude selection
# sees the same numbers alg and mergekit see), everything after in float64.
# DARE and DELLA draw random masks: their configs run at density 1 (no draw; the test
# rewrites every density to 1), where mergekit's rescaling is the identity too.

_MK_DEFAULTS = {  # mergekit 0.1.5's defaults (merge_methods/registry.py and signatures)
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "rescale": False},
    "ties": {"normalize": True, "rescale": False},
    "dare_linear": {"normalize": False, "rescale": True},
    "dare_ties": {"normalize": False, "rescale": True},
    "breadcrumbs": {"normalize": False, "rescale": False, "gamma": 0.01},
    "breadcrumbs_ties": {"normalize": False, "rescale": False, "gamma": 0.01},
    "della": {"normalize": True, "rescale": True, "epsilon": 0.15},
    "della_linear": {"normalize": False, "rescale": True, "epsilon": 0.15},
    "model_stock": {"filter_wise": False},
    "nuslerp": {"nuslerp_flatten": True, "nuslerp_row_wise": False},
    "passthrough": {"scale": None},
    "slerp": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    "arcee_fusion": {},
}
_GTA = {"task_arithmetic": (None, False), "ties": ("magnitude", True), "dare_linear": ("random", False),
        "dare_ties": ("random", True), "breadcrumbs": ("outliers", False),
        "breadcrumbs_ties": ("outliers", True), "della": ("della", True), "della_linear": ("della", False)}
_SHARED = {"normalize", "rescale", "lambda", "int8_mask", "t", "filter_wise", "nuslerp_flatten",
           "nuslerp_row_wise", "select_topk", "r", "alpha"}


def _mk_value(setting, name: str, t: float):
    if isinstance(setting, dict):
        setting = [setting]
    return _mergekit_setting(setting, name, t)


def _mk_param(cfg, slc, model, pname: str, name: str, t: float, method: str):
    levels = []
    if model is not None:
        levels += [s.get("parameters") for s in slc["sources"] if s["model"] == model]
    levels += [slc.get("parameters"), cfg.get("parameters")]
    for lv in levels:
        if lv and pname in lv:
            v = _mk_value(lv[pname], name, t)
            if v is not None:
                return v
    dflt = {"lambda": 1.0, "density": 1.0, "int8_mask": False, **_MK_DEFAULTS[method]}
    if pname not in dflt:
        raise KeyError(f"missing {pname} for {name}")
    return dflt[pname]


def _mk_sparsify(d, kind: str, density: float, gamma: float):
    import torch

    if kind is None or density >= 1:
        return d
    assert kind in ("magnitude", "outliers"), "random methods run at density 1"
    n = d.numel()
    w = d.abs().reshape(-1)
    mask = torch.zeros(n, dtype=d.dtype)
    if kind == "magnitude":
        k = max(1, int(density * n))
        mask[torch.argsort(w, descending=True)[:k]] = 1
    else:
        target, top = int(density * n), int(gamma * n)
        bot = max(0, n - target - top)
        mask[torch.argsort(w)[bot:bot + target]] = 1
    return d * mask.reshape(d.shape)


def _mk_slerp(t: float, a, b, eps=1e-8):
    import torch

    na, nb = a.norm(), b.norm()
    na, nb = (na if na > eps else 1), (nb if nb > eps else 1)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    th = torch.acos(dot)
    return torch.sin((1 - t) * th) / torch.sin(th) * a + torch.sin(t * th) / torch.sin(th) * b


def _mk_nuslerp(t: float, v0, v1, dim: int, flatten: bool, eps=1e-8):
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    th = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    res = (torch.sin((1 - t) * th) * v0 + torch.sin(t * th) * v1) / torch.sin(th)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


def _mk_tensor(cfg, slc, out_name: str, in_names: list[str], t: float, states) -> object:
    """One output tensor of one mergekit config, in float64."""
    import torch

    method = cfg["merge_method"]
    base_ref = slc.get("base_model") or cfg.get("base_model")
    models = [s["model"] for s in slc["sources"]]
    x32 = {m: states[m][n].float() for m, n in zip(models, in_names, strict=True)}
    x = {m: v.double() for m, v in x32.items()}
    name_of = dict(zip(models, in_names, strict=True))

    def shared(p):
        return _mk_param(cfg, slc, None, p, out_name, t, method)

    def per(m, p):
        return _mk_param(cfg, slc, m, p, name_of[m], t, method)

    if method == "passthrough":
        (m,) = models
        s = per(m, "scale")
        return x[m] if s is None else x[m] * s
    if method == "linear":
        ws = [per(m, "weight") for m in models]
        out = sum(w * x[m] for w, m in zip(ws, models, strict=True))
        return out / sum(ws) if shared("normalize") else out
    others = [m for m in models if m != base_ref]
    if method in ("ram", "ramplus_tl"):
        from test_methods_ram import ref_ram

        plus = (shared("r"), shared("alpha")) if method == "ramplus_tl" else None
        one = ref_ram({"t": x32[base_ref]}, [{"t": x32[m]} for m in others], shared("epsilon"), plus)
        return one["t"]
    if method == "arcee_fusion":  # mergekit at dtype float32: the same entries taken
        from test_methods_fusion import ref_arcee_fusion

        return ref_arcee_fusion({"t": x32[base_ref]}, {"t": x32[others[0]]}, torch.float32)["t"].double()
    if method == "slerp":
        return _mk_slerp(shared("t"), x[base_ref], x[others[0]])
    if method == "nuslerp":
        ws = [per(m, "weight") for m in others]
        tt = 0.5 if abs(sum(ws)) < 1e-6 else ws[1] / sum(ws)
        dim = 0 if shared("nuslerp_row_wise") else -1
        flat = shared("nuslerp_flatten")
        if base_ref in x:
            b = x[base_ref]
            return b + _mk_nuslerp(tt, x[others[0]] - b, x[others[1]] - b, dim, flat)
        return _mk_nuslerp(tt, x[others[0]], x[others[1]], dim, flat)
    if method == "model_stock":
        w0 = x[base_ref]
        ws = [x[m] for m in others]
        if shared("filter_wise"):
            flat = [w.unsqueeze(0) if w.dim() == 1 else w for w in [w0, *ws]]
        else:
            flat = [w.reshape(-1) for w in [w0, *ws]]
        offs = [w - flat[0] for w in flat[1:]]
        cos = []
        for i, a in enumerate(offs):
            for b in offs[i + 1:]:
                cos.append(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1))
        c = torch.stack(cos).mean(0).unsqueeze(-1)
        n = len(ws)
        tt = n * c / (1 + (n - 1) * c)
        return (tt * (sum(flat[1:]) / n) + (1 - tt) * flat[0]).reshape(w0.shape)
    kind, consensus = _GTA[method]
    base = x[base_ref]
    deltas, ws = [], []
    for m in others:
        d = (x32[m] - x32[base_ref]).double()  # mergekit at dtype float32
        gamma = per(m, "gamma") if "gamma" in _MK_DEFAULTS[method] else 0.0
        d = _mk_sparsify(d, kind, per(m, "density"), gamma)
        w = per(m, "weight")
        deltas.append(d * w)
        ws.append(torch.full_like(d, w))
    D, W = torch.stack(deltas), torch.stack(ws)
    if consensus:
        majority = torch.where(D.sum(0) >= 0, 1.0, -1.0).double()
        mask = (D.sign() == majority).double()
        mixed = (D * mask).sum(0)
        div = (W * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = D.sum(0)
        div = W.sum(0)
        div[div.abs() < 1e-8] = 1
    if shared("normalize"):
        mixed = mixed / div
    return base + shared("lambda") * mixed


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _mk_merge(cfg, states) -> dict:
    """mergekit's plan for a Llama-shaped model: pre weights, layers slice by slice, post."""

    if "models" in cfg:
        srcs = [{"model": m["model"], "parameters": m.get("parameters")} for m in cfg["models"]]
        if cfg.get("base_model") and all(s["model"] != cfg["base_model"] for s in srcs):
            srcs.append({"model": cfg["base_model"], "parameters": None})
        n = 1 + max(int(_LAYER.match(k)[1]) for k in states[srcs[0]["model"]] if _LAYER.match(k))
        for s in srcs:
            s["layer_range"] = [0, n]
        slices = [{"sources": srcs}]
    else:
        slices = cfg["slices"]
    first = states[slices[0]["sources"][0]["model"]]
    suffixes = sorted({m[2] for k in first if (m := _LAYER.match(k)) and m[1] == "0"})
    pre = [k for k in first if not _LAYER.match(k) and "embed" in k]
    post = [k for k in first if not _LAYER.match(k) and "embed" not in k]
    out = {}
    for k in pre:
        out[k] = _mk_tensor(cfg, slices[0], k, [k] * len(slices[0]["sources"]), 0.0, states)
    o = 0
    for slc in slices:
        n = slc["sources"][0]["layer_range"][1] - slc["sources"][0]["layer_range"][0]
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            for suf in suffixes:
                ins = [f"model.layers.{s['layer_range'][0] + j}.{suf}" for s in slc["sources"]]
                out[f"model.layers.{o + j}.{suf}"] = _mk_tensor(cfg, slc, f"model.layers.{o + j}.{suf}",
                                                                ins, t, states)
        o += n
    for k in post:
        out[k] = _mk_tensor(cfg, slices[-1], k, [k] * len(slices[-1]["sources"]), 0.0, states)
    return out


def _for_the_test(config: Path) -> tuple[str, list[dict]]:
    """The config as the run test uses it: float32 throughout, densities of the random
    methods at 1 (and DELLA's epsilon at 0, unused there)."""
    import yaml

    docs = [d for d in yaml.safe_load_all(config.read_text()) if d]
    for d in docs:
        d["dtype"] = "float32"
        d.pop("out_dtype", None)
        if d["merge_method"] in ("dare_linear", "dare_ties", "della", "della_linear"):
            if d["merge_method"].startswith("della"):
                # alg's della refuses density + epsilon > 1, where mergekit at density 1
                # keeps everything (docs/mergekit.md); at density 1 epsilon is unused
                d["parameters"] = {**(d.get("parameters") or {}), "epsilon": 0.0}
            models = [m.get("parameters") or {} for m in d.get("models", [])]
            for lv in [d.get("parameters") or {}, *models]:
                if "density" in lv:
                    lv["density"] = 1.0
            for lv in models:
                lv.pop("epsilon", None)  # a model's own epsilon: unused at density 1 too
    return yaml.safe_dump_all(docs, sort_keys=False), docs


# a MODEL+LORA reference needs a PEFT adapter: lora() is checked against peft in
# tests/test_lora.py, and the converted configs against mergekit by conformance_mergekit.py
RUNNABLE = [p for p in CONFIGS if "+" not in p.read_text()]


@pytest.mark.parametrize("config", RUNNABLE, ids=[p.stem for p in RUNNABLE])
def test_converted_recipes_run_and_equal_mergekit(config, deep_family, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    text, docs = _for_the_test(config)
    paths = _model_paths(config, deep_family)
    recipe = tmp_path / f"{config.stem}.alg"
    recipe.write_text(mergekit_to_alg(text, name=config.name, model_paths=paths))
    out = tmp_path / "out"
    code = main(["run", str(recipe), "--device", "cpu", "--set", f"out={out}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))

    states = {r: {k: v for k, v in load_file(Path(p) / "model.safetensors").items()} for r, p in paths.items()}
    for d in docs:
        result = _mk_merge(d, states)
        for key in ("out_path", "name"):
            if key in d:
                states[d[key]] = {k: v.float() for k, v in result.items()}
    want = result
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == torch.float32 and g.shape == w.shape, k
        err = (g.double() - w).abs().max().item()
        assert err <= 1e-5 * max(1.0, w.abs().max().item()), (k, err)


def test_yaml_positions_survive_flow_and_block_styles():
    src = Source("a:\n  - {model: x/y, parameters: {weight: 0.5}}\n", "c.yml")
    (doc,) = documents(src)
    entry = Y(doc.node.value[0][1], src)
    first = entry.seq("a")[0]
    model = dict((k, v) for k, _, v in first.items())["model"]
    assert (model.span.line, model.span.col, model.span.text()) == (2, 13, "x/y")
