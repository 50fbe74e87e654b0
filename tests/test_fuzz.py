"""Grammar-aware fuzzing of `alg check`: whatever the recipe, checking it ends, soon, in
either success or a positioned user error (an `AlgError` with a span); never another
exception, a hang or a stack overflow.

Two generators, both driven by hypothesis with derandomize=True (the same recipes on every
run, so a failure reproduces):
  - `grammar_recipes` derives random programs from the rules of grammar/alg.lark itself
    (read from the parser, so a rule added to the grammar is fuzzed without a change
    here), with names, numbers and strings drawn from vocabularies of the builtins, the
    fixture checkpoints and hostile literals (1e999, 400-digit integers, ...);
  - `mutated_recipes` takes the example recipes (examples/*.alg, tests/alg/*.alg) and
    deletes, duplicates, repeats and inserts fragments.
Only parse + check run (no save, no weights read), against the tiny fixture checkpoints.

Each recipe gets RECIPE_SECONDS of wall-clock time, enforced with SIGALRM; it exists to
catch hangs, not to time anything, so it is generous for a loaded machine, and the
fuzz lowers the check-time step budget (ALG_MAX_STEPS) so a budget error comes well
within it. The default tier checks DEFAULT_EXAMPLES recipes per generator, the slow tier
(`-m slow`, which CI runs) SLOW_EXAMPLES, and `-m fuzz` FUZZ_EXAMPLES, by hand.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from algebra.errors import AlgError
from algebra.interpreter import Session
from algebra.options import Options
from algebra.parser import _lark
from algebra.source import Source

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted([*ROOT.glob("examples/*.alg"), *ROOT.glob("tests/alg/*.alg")])
RECIPE_SECONDS = 20
FUZZ_STEPS = "200000"
# recipes per generator: the default tier, the slow tier (CI runs it) and the long `fuzz`
# tier, run by hand (each test derives its own fixed seed, so each tier checks other recipes)
DEFAULT_EXAMPLES, SLOW_EXAMPLES, FUZZ_EXAMPLES = 50, 150, 1500

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM to bound each recipe")


class _TooSlow(BaseException):
    pass


def _alarm(signum, frame):
    raise _TooSlow()


@pytest.fixture(scope="module")
def fuzz_ws(tmp_path_factory, family, rms) -> Path:
    ws = tmp_path_factory.mktemp("fuzz")
    (ws / "models").mkdir()
    for name, path in {**family, **rms}.items():
        (ws / "models" / name).symlink_to(path)
    (ws / "models" / "sft").symlink_to(family["base"])
    shutil.copytree(ROOT / "examples" / "data", ws / "data")
    (ws / "lib.alg").write_text("def twice(x) = 2 * x\n")
    try:  # a PEFT adapter on the base, for lora()
        from test_lora import _adapter

        _adapter(family["base"], ws / "adapter", 9, r=2, lora_alpha=4)
    except pytest.skip.Exception:  # no peft: lora() meets only missing folders
        pass
    return ws


@pytest.fixture(scope="module", autouse=True)
def _small_budget():
    old = os.environ.get("ALG_MAX_STEPS")
    os.environ["ALG_MAX_STEPS"] = FUZZ_STEPS
    yield
    if old is None:
        del os.environ["ALG_MAX_STEPS"]
    else:
        os.environ["ALG_MAX_STEPS"] = old


def check_outcome(ws: Path, text: str) -> str:
    """'ok' or 'error'; fails the test on anything else (with the recipe to reproduce)."""
    session = Session(Options(device="cpu", warn=lambda d: None, out=lambda s: None), ws, mode="file")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(RECIPE_SECONDS)
    try:
        session.check(Source(text, "fuzz.alg"))
        return "ok"
    except AlgError as e:
        assert e.span is not None, f"unpositioned error {e.message!r} for recipe:\n{text}"
        assert e.span.source.name == "fuzz.alg" or e.notes, f"error outside the recipe: {e}\n{text}"
        return "error"
    except _TooSlow:
        pytest.fail(f"checking took more than {RECIPE_SECONDS} s:\n{text[:2000]}")
    except Exception as e:  # an internal error: exactly what the fuzz looks for
        raise AssertionError(f"internal error {type(e).__name__}: {e}\nrecipe:\n{text[:2000]}") from e
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- recipes from the grammar -------------------------------------------------------------

NAMES = ["a", "b", "m", "x", "xs", "f", "lam", "load", "save", "print", "info", "lerp", "merge",
         "slerp", "range", "len", "fold", "str", "layers", "stack", "ramp", "where", "linear",
         "ties", "dare_ties", "karcher", "nuslerp", "task_arithmetic", "assert_close", "liti", "ema",
         "reward", "pairs", "responses", "score", "evaluate", "Scalar", "List", "Checkpoint", "Int",
         "warp", "dogerm", "prelude", "t", "seed", "max_iter", "shard_size", "overwrite", "dtype"]
NUMBERS = ["0", "1", "2", "3", "0.5", "1.0", "1e-9", "1e308", "1e999", "2.5", "100000",
           "1000000", "9" * 400, "0" * 50 + "1", ".5", "9223372036854775808"]
STRINGS = ['"models/base"', '"models/math"', '"models/rm"', '"models/rl1"', '"out/x"', '"out/y"',
           '"self_attn"', '"("', '"bf16"', '"5GB"', '"1e999GB"', '""', '"lib.alg"',
           '"data/prefs.jsonl"', "'x'", '"\\n"', '"layers[.]0"']
PRELUDE = 'a = load("models/base"); b = load("models/math"); m = load("models/rl1")\n'
MAX_DEPTH = 24  # rule levels; a bare literal is already 7 deep (expr, sum, ..., atom)


@functools.cache
def _grammar():
    """The parser's rules as origin -> expansions (lists of symbol names), each rule's
    minimal derivation depth, and how each anonymous terminal is written (computed once)."""
    lark = _lark()
    rules: dict[str, list[list[tuple[str, bool]]]] = {}
    for r in lark.rules:
        rules.setdefault(str(r.origin.name), []).append([(str(s.name), s.is_term) for s in r.expansion])
    depth = {name: 10**9 for name in rules}
    changed = True
    while changed:
        changed = False
        for name, exps in rules.items():
            for exp in exps:
                d = 1 + max((depth[s] for s, term in exp if not term), default=0)
                if d < depth[name]:
                    depth[name], changed = d, True
    literal = {}
    for t in lark.terminals:
        value = getattr(t.pattern, "value", None)
        if t.pattern.type == "str":
            literal[t.name] = value
        else:  # the regular expressions that read as fixed punctuation
            literal[t.name] = {"LPAR": "(", "RPAR": ")", "LSQB": "[", "RSQB": "]", "VBAR": "|",
                               "PLUS": "+", "MINUS": "-", "STAR": "*", "DOT": "."}.get(t.name)
    return rules, depth, literal


@functools.cache
def _choices():
    """One sampled_from strategy per rule (all its expansions, and the shallowest ones
    that end a derivation past MAX_DEPTH) and per kind of terminal, built once: a
    strategy made afresh for each of a recipe's thousands of draws is validated and
    labelled afresh, which was most of the generator's time."""
    rules, depth, _ = _grammar()

    def d(e):
        return 1 + max((depth[s] for s, t in e if not t), default=0)

    full = {name: st.sampled_from(exps) for name, exps in rules.items()}
    shallow = {name: st.sampled_from([e for e in exps if d(e) == min(map(d, exps))])
               for name, exps in rules.items()}
    terminals = {"NAME": st.sampled_from(NAMES), "NUMBER": st.sampled_from(NUMBERS),
                 "STRING": st.sampled_from(STRINGS)}
    return full, shallow, terminals


@st.composite
def grammar_recipes(draw) -> str:
    _, _, literal = _grammar()
    full, shallow, terminals = _choices()
    out: list[str] = []

    def terminal(name: str) -> str:
        if name in terminals:
            return draw(terminals[name])
        if name == "_NL":
            return "\n"
        assert literal.get(name) is not None, f"no spelling for terminal {name}"
        return literal[name]

    # an explicit stack: the generator itself must not recurse past Python's limit
    todo: list[tuple[str, bool, int]] = [("start", False, 0)]
    while todo:
        sym, term, level = todo.pop()
        if term:
            out.append(terminal(sym))
            continue
        # past MAX_DEPTH, only the shallowest ways out from here
        exp = draw(shallow[sym] if level >= MAX_DEPTH else full[sym])
        todo.extend((s, t, level + 1) for s, t in reversed(exp))
    return PRELUDE + " ".join(out)


# ---- calls of builtins with plausible and hostile arguments -----------------------------------
#
# Random grammar derivations mostly stop at the first type error; these recipes call
# builtins with arguments of the right kinds often enough to reach their checks.

FUNCS = ["lerp", "merge", "slerp", "layers", "stack", "ramp", "where", "linear", "ties", "dare_ties",
         "dare_linear", "della", "breadcrumbs", "karcher", "nuslerp", "multislerp", "nearswap",
         "task_arithmetic", "sce", "liti", "ema", "range", "len", "str", "fold", "assert_close", "reward",
         "layers", "info", "print", "save", "align", "task_vector", "anchor", "warp", "dogerm", "ram", "ramplus_tl",
         "arcee_fusion", "lora"]
KWARGS = ["t", "seed", "max_iter", "tol", "base", "weights", "density", "shard_size", "dtype",
          "overwrite", "per", "tokenizer", "normalize", "scale", "epsilon", "gamma", "batch_size",
          "max_length", "init", "rtol", "atol", "topk", "r", "alpha", "chat_template"]
ATOMS = ["a", "b", "m", "[a, b]", "[a, b, m]", "[]", "0", "1", "0.5", "-1", "2.5", "1e308", "1e999",
         "9" * 400, "1e-300", "9223372036854775808", '"models/base"', '"out/x"', '"self_attn"',
         '"1e999GB"', '"layer"', "true", "none", "ramp(0, 1)", "where(\"mlp\", 0.2, 0.8)",
         "range(3)", "range(100000)", "[0.5, 0.5]", "lambda x, y: x + y", "layers(a, 0, 1)",
         '"adapter"', '"chatml"', '"auto"', '"{% for x in messages %}"', '"{{ bos_token }}"']


@st.composite
def call_recipes(draw) -> str:
    def expr(level: int) -> str:
        if level > 2 or draw(st.booleans()):
            return draw(st.sampled_from(ATOMS))
        f = draw(st.sampled_from(FUNCS))
        args = [expr(level + 1) for _ in range(draw(st.integers(0, 4)))]
        kws = [f"{k}={expr(level + 1)}" for k in draw(st.lists(st.sampled_from(KWARGS), max_size=2, unique=True))]
        op = draw(st.sampled_from(["", "", " * 0.5", " + a", " - b", " / 0"]))
        return f"{f}({', '.join(args + kws)}){op}"

    lines = [f"x{i} = {expr(0)}" for i in range(draw(st.integers(0, 2)))]
    sink = draw(st.sampled_from(["print({})", "save({}, \"out/x\")", "info({})", "{}"]))
    lines.append(sink.format(expr(0)))
    return PRELUDE + "use warp\nuse dogerm\n" + "\n".join(lines)


# ---- mutated examples ----------------------------------------------------------------------

FRAGMENTS = ["(", ")", "[", "]", ",", "-", "+", "*", "/", "=", ":", ";", "\n", '"', "'", "#",
             "1e999", "9" * 400, "lambda x: ", "str(", "range(100000)", "[x for x in range(1000000)]",
             "load(", "def f(n) = [f(n - 1)]\n", "def g(x = g()) = x\n", "fold(", "\\\n", "\t", "é",
             "\x00", "none", "true", "a + ", "layers(a, 0, ", "seed=", "max_iter=", "shard_size="]


@st.composite
def mutated_recipes(draw) -> str:
    text = EXAMPLES[draw(st.integers(0, len(EXAMPLES) - 1))].read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 4))):
        n = len(text)
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 40)))
        kind = draw(st.sampled_from(["delete", "insert", "duplicate", "repeat", "replace"]))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(FRAGMENTS)) + text[i:]
        elif kind == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif kind == "repeat":  # deep nesting and long lines
            times = draw(st.sampled_from([2, 10, 250, 600]))
            text = text[:i] + draw(st.sampled_from(FRAGMENTS + [text[i:j]])) * times + text[i:]
        else:
            text = text[:i] + draw(st.sampled_from(FRAGMENTS)) + text[j:]
    return text


# ---- the tests -------------------------------------------------------------------------------

def _settings(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@_settings(DEFAULT_EXAMPLES)
@given(text=grammar_recipes())
def test_grammar_recipes_check_or_fail_positioned(fuzz_ws, text):
    _lark().parse(text)  # the generator follows the grammar (as the test below checks alone)
    check_outcome(fuzz_ws, text)


@_settings(DEFAULT_EXAMPLES)
@given(text=mutated_recipes())
def test_mutated_examples_check_or_fail_positioned(fuzz_ws, text):
    check_outcome(fuzz_ws, text)


@_settings(DEFAULT_EXAMPLES)
@given(text=call_recipes())
def test_builtin_calls_check_or_fail_positioned(fuzz_ws, text):
    check_outcome(fuzz_ws, text)


@pytest.mark.slow
@_settings(SLOW_EXAMPLES)
@given(text=grammar_recipes())
def test_grammar_recipes_more(fuzz_ws, text):
    check_outcome(fuzz_ws, text)


@pytest.mark.slow
@_settings(SLOW_EXAMPLES)
@given(text=mutated_recipes())
def test_mutated_examples_more(fuzz_ws, text):
    check_outcome(fuzz_ws, text)


@pytest.mark.slow
@_settings(SLOW_EXAMPLES)
@given(text=call_recipes())
def test_builtin_calls_more(fuzz_ws, text):
    check_outcome(fuzz_ws, text)


@pytest.mark.fuzz
@_settings(FUZZ_EXAMPLES)
@given(text=call_recipes())
def test_builtin_calls_long(fuzz_ws, text):
    check_outcome(fuzz_ws, text)


@pytest.mark.fuzz
@_settings(FUZZ_EXAMPLES)
@given(text=grammar_recipes())
def test_grammar_recipes_long(fuzz_ws, text):
    check_outcome(fuzz_ws, text)


@pytest.mark.fuzz
@_settings(FUZZ_EXAMPLES)
@given(text=mutated_recipes())
def test_mutated_examples_long(fuzz_ws, text):
    check_outcome(fuzz_ws, text)


def test_the_examples_check(fuzz_ws):
    """The unmutated examples are ok: the fuzz starts from recipes that check."""
    for path in EXAMPLES:
        assert check_outcome(fuzz_ws, path.read_text(encoding="utf-8")) == "ok", path.name


@pytest.mark.slow  # the default tier parses every recipe it checks: the same assertion
def test_the_grammar_generator_makes_valid_programs():
    """Every generated recipe is accepted by the grammar: the generator follows it (a
    syntax error would mean it does not, and the fuzz would test only the error path)."""
    seen = []

    @_settings(50)
    @given(text=grammar_recipes())
    def run(text):
        _lark().parse(text)
        seen.append(text)

    run()
    assert len(seen) == 50
