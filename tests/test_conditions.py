"""Comparisons, and/or/not and `x if c else y` (issue 11): Python's precedence, chaining and
short-circuit, checked against Python's own evaluation; positioned errors for the wrong
types; comprehension conditions; no false "unused" warning for a list of saves."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from algebra import ast
from algebra.check import Checker
from algebra.errors import AlgError, AlgSyntaxError, AlgTypeError
from algebra.options import Options
from algebra.parser import parse, parse_expr
from algebra.source import Source


def value(text: str, base=None):
    ck = Checker(Options(device="cpu"), base, mode="eval")
    return ck.check(parse(Source(text, "t.alg"))).result


def error(text: str, base=None) -> AlgError:
    with pytest.raises(AlgError) as info:
        value(text, base)
    return info.value


# ---- precedence against Python -------------------------------------------------------
#
# A random expression tree over ints and bools, printed with only the parentheses that
# Python's precedence needs (levels below, from Python's reference), is evaluated by
# Python's eval and by alg; the two must agree, value and type.

IF, OR, AND, NOT, CMP, SUM, PROD, UNARY, ATOM = range(9)
CMP_OPS = ["<", "<=", ">", ">=", "==", "!="]


def _wrap(text: str, prec: int, need: int) -> str:
    return f"({text})" if prec < need else text


@st.composite
def ints(draw, depth=0) -> tuple[str, str, int]:
    """(alg text, Python text, precedence) of an int-valued expression."""
    if depth > 3 or draw(st.integers(0, 3)) == 0:
        n = str(draw(st.integers(0, 9)))
        return n, n, ATOM
    kind = draw(st.sampled_from(["+", "-", "*", "neg", "if"]))
    if kind == "neg":
        a, p, pr = draw(ints(depth + 1))
        return "-" + _wrap(a, pr, UNARY), "-" + _wrap(p, pr, UNARY), UNARY
    if kind == "if":
        (a1, p1, r1), (c1, c2, rc), (a2, p2, r2) = (draw(ints(depth + 1)), draw(bools(depth + 1)),
                                                     draw(ints(depth + 1)))
        return (f"{_wrap(a1, r1, OR)} if {_wrap(c1, rc, OR)} else {_wrap(a2, r2, IF)}",
                f"{_wrap(p1, r1, OR)} if {_wrap(c2, rc, OR)} else {_wrap(p2, r2, IF)}", IF)
    prec = PROD if kind == "*" else SUM
    (a1, p1, r1), (a2, p2, r2) = draw(ints(depth + 1)), draw(ints(depth + 1))
    return (f"{_wrap(a1, r1, prec)} {kind} {_wrap(a2, r2, prec + 1)}",
            f"{_wrap(p1, r1, prec)} {kind} {_wrap(p2, r2, prec + 1)}", prec)


@st.composite
def bools(draw, depth=0) -> tuple[str, str, int]:
    """(alg text, Python text, precedence) of a bool-valued expression."""
    if depth > 3 or draw(st.integers(0, 3)) == 0:
        b = draw(st.booleans())
        return ("true" if b else "false"), str(b), ATOM
    kind = draw(st.sampled_from(["and", "or", "not", "cmp", "eq", "if"]))
    if kind == "not":
        a, p, pr = draw(bools(depth + 1))
        return "not " + _wrap(a, pr, NOT), "not " + _wrap(p, pr, NOT), NOT
    if kind == "cmp":  # a chain a < b >= c ... over ints
        n = draw(st.integers(1, 3))
        operands = [draw(ints(depth + 1)) for _ in range(n + 1)]
        ops = [draw(st.sampled_from(CMP_OPS)) for _ in range(n)]
        parts_a = [_wrap(operands[0][0], operands[0][2], SUM)]
        parts_p = [_wrap(operands[0][1], operands[0][2], SUM)]
        for op, (a, p, pr) in zip(ops, operands[1:], strict=True):
            parts_a += [op, _wrap(a, pr, SUM)]
            parts_p += [op, _wrap(p, pr, SUM)]
        return " ".join(parts_a), " ".join(parts_p), CMP
    if kind == "eq":  # Bool == Bool
        (a1, p1, r1), (a2, p2, r2) = draw(bools(depth + 1)), draw(bools(depth + 1))
        op = draw(st.sampled_from(["==", "!="]))
        return (f"{_wrap(a1, r1, SUM)} {op} {_wrap(a2, r2, SUM)}",
                f"{_wrap(p1, r1, SUM)} {op} {_wrap(p2, r2, SUM)}", CMP)
    if kind == "if":
        (a1, p1, r1), (c1, c2, rc), (a2, p2, r2) = (draw(bools(depth + 1)), draw(bools(depth + 1)),
                                                     draw(bools(depth + 1)))
        return (f"{_wrap(a1, r1, OR)} if {_wrap(c1, rc, OR)} else {_wrap(a2, r2, IF)}",
                f"{_wrap(p1, r1, OR)} if {_wrap(c2, rc, OR)} else {_wrap(p2, r2, IF)}", IF)
    prec = AND if kind == "and" else OR
    (a1, p1, r1), (a2, p2, r2) = draw(bools(depth + 1)), draw(bools(depth + 1))
    return (f"{_wrap(a1, r1, prec)} {kind} {_wrap(a2, r2, prec + 1)}",
            f"{_wrap(p1, r1, prec)} {kind} {_wrap(p2, r2, prec + 1)}", prec)


def _matches_python(expr):
    alg_text, py_text, _ = expr
    expected = eval(py_text)  # noqa: S307 - our own generated arithmetic and logic
    got = value(alg_text)
    assert got == expected and type(got) is type(expected), (alg_text, py_text, got, expected)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.one_of(ints(), bools()))
def test_precedence_matches_python(expr):
    _matches_python(expr)


@pytest.mark.slow  # the same property on three times the expressions
@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(ints(), bools()))
def test_precedence_matches_python_long(expr):
    _matches_python(expr)


@pytest.mark.parametrize("alg_text, py_text", [
    ("not 1 < 2 and 3 > 2 or false", "not 1 < 2 and 3 > 2 or False"),
    ("1 if 1 > 2 else 2 if true else 3", "1 if 1 > 2 else 2 if True else 3"),
    ("-1 < 2 == 2 > 1", "-1 < 2 == 2 > 1"),
    ("1 + 2 * 3 > 6 == true", None),  # a Scalar-then-Bool chain: 7 > 6 and 6 == true
    ("true or false and false", "True or False and False"),
    ("not true == false", "not True == False"),
    ("2 * 3 if not false else 0", "2 * 3 if not False else 0"),
])
def test_precedence_table(alg_text, py_text):
    if py_text is None:  # Python would say False (6 == True); alg refuses Scalar == Bool
        assert "cannot compare Scalar and Bool" in error(alg_text).message
    else:
        assert value(alg_text) == eval(py_text)  # noqa: S307


def test_the_ast_shape():
    e = parse_expr("a if not b < c < d and e or f else g")
    assert isinstance(e, ast.IfExp) and isinstance(e.cond, ast.BoolOp) and e.cond.op == "or"
    a = e.cond.left
    assert isinstance(a, ast.BoolOp) and a.op == "and" and isinstance(a.left, ast.Not)
    cmp = a.left.operand
    assert isinstance(cmp, ast.Compare) and cmp.ops == ("<", "<") and len(cmp.operands) == 3


# ---- chaining and short-circuit ----------------------------------------------------------


def test_chained_comparison_is_pairwise_like_python():
    assert value("1 < 2 < 3") is True and value("1 < 3 < 2") is False
    assert value("3 > 2 > 2") is False and value("1 == 1 != 2") is True
    # the middle operand is evaluated once, and the chain stops at the first false
    assert value("[1 < x < 3 for x in [0, 1, 2, 3]]") == (False, False, True, False)
    assert value('1 > 2 < "not even comparable"') is False


def test_untaken_operands_and_branches_are_not_evaluated():
    assert value("true or 1 / 0 > 0") is True
    assert value("false and 1 / 0 > 0") is False
    assert value('1 if true else nope(1 / 0)') == 1
    assert value('nope() if false else "b"') == "b"
    # the taken side is evaluated, so its error is real
    assert "division by zero" in error("false or 1 / 0 > 0").message
    assert "unknown name 'nope'" in error("nope() if true else 1").message


def test_short_circuit_skips_sinks(family, tmp_path):
    b = family["base"]
    ck = Checker(Options(device="cpu"), tmp_path, mode="file")
    checked = ck.check(parse(Source(f'a = load("{b}")\nk = 0\n'
                                    f'[save(a, "out/" + str(t)) for t in [1, 2, 3] if t > 1 and t != 3]\n'
                                    f'x = print("no") if k > 0 else 0', "s.alg")))
    saves = [s for s in checked.sinks if s.kind == "save"]
    assert [s.value.path.name for s in saves] == ["2"]
    assert not [s for s in checked.sinks if s.kind == "print"]


def test_strings_and_equality():
    assert value('"abc" < "abd" and "b" >= "a"') is True
    assert value('"x" == "x" and "x" != "y"') is True
    assert value("[1, 2] == [1, 2] and [1] != [2]") is True
    assert value("none == none and not (1 == none)") is True
    assert value("1 == 1.0") is True


# ---- comprehensions -------------------------------------------------------------------


def test_comprehension_conditions():
    assert value("[t * 2 for t in [-1, 0, 2, 3] if t > 0]") == (4, 6)
    assert value('[s for s in ["a", "bb", "c"] if s != "bb" and not s == "c"]') == ("a",)
    assert value("[x if x > 1 else 0 for x in range(4)]") == (0, 0, 2, 3)
    assert value("[x for x in [1, 2, 3] if x > 1 or x < 0]") == (2, 3)


# ---- positioned errors ------------------------------------------------------------------


@pytest.mark.parametrize("text, fragment, col, length", [
    ('1 < "a"', "cannot compare Scalar and String with '<'", 1, 7),
    ("x = 2\ny = x > true", "cannot compare Scalar and Bool with '>'", 5, 8),
    ("true < false", "'<' compares two Scalars or two Strings", 1, 12),
    ("1 == true", "cannot compare Scalar and Bool with '=='", 1, 9),
    ("1 and true", "an operand of 'and' must be Bool, not Scalar", 1, 1),
    ('true or "s"', None, 1, 4),  # short-circuit: no error at all
    ('false or "s"', "an operand of 'or' must be Bool, not String", 10, 3),
    ("not 0", "the operand of 'not' must be Bool, not Scalar", 5, 1),
    ("1 if 2 else 3", "the condition of 'if ... else' must be Bool, not Scalar", 6, 1),
    ("[x for x in [1] if x]", "condition must be Bool, not Scalar", 20, 1),
])
def test_wrong_types_are_positioned_errors(text, fragment, col, length):
    if fragment is None:
        value(text)
        return
    err = error(text)
    assert isinstance(err, AlgTypeError) and fragment in err.message
    last = text.splitlines()[-1]
    assert err.span.col == col and err.span.end - err.span.start == length, (err.span.text(), last)


def test_checkpoints_and_rewards_refuse_equality(family):
    b = family["base"]
    for op in ("==", "!=", "<"):
        err = error(f'a = load("{b}")\nx = 1 {op} a')
        assert "checkpoint (or reward model) cannot be compared" in err.message
        assert err.span.line == 2 and err.span.text() == "a"
    # the same checkpoint twice: still refused, not silently identity
    assert "cannot be compared" in error(f'a = load("{b}")\na == a').message
    # whether an optional checkpoint was given is a question for none, and allowed
    assert value(f'def f(m: Checkpoint | None = none) = 1 if m == none else 2\n[f(), f(load("{b}"))]') == (1, 2)
    assert value(f'load("{b}") != none') is True


def test_per_layer_values_point_to_where():
    for text in ("ramp(0, 1) > 0.5", "0.5 <= ramp(0, 1)", 'where("mlp", 0.2, 0.8) == 0.2'):
        err = error(text)
        assert "per-layer value" in err.message and "where(pattern, a, b)" in err.message
        assert "ramp" in err.span.text() or "where" in err.span.text()


def test_new_keywords_are_not_names():
    for kw in ("and", "or", "not", "else"):
        with pytest.raises(AlgSyntaxError):
            parse(f"{kw} = 1")


# ---- the "unused" warning -----------------------------------------------------------------


def _warnings(text: str, tmp_path) -> list:
    warnings = []
    ck = Checker(Options(device="cpu", warn=warnings.append), tmp_path, mode="file")
    ck.check(parse(Source(text, "w.alg")))
    return [w for w in warnings if "unused" in w.message]


def test_a_list_of_saves_is_not_unused(family, tmp_path):
    a, b = family["base"], family["math"]
    text = (f'a = load("{a}")\nb = load("{b}")\n'
            '[save(lerp(a, b, t), "out/" + str(t)) for t in [0.1, 0.2]]\n')
    assert _warnings(text, tmp_path) == []
    # a list that holds sinks among other values acted too
    assert _warnings(f'a = load("{a}")\n[print(1), 2]\n', tmp_path) == []
    # a list with no sinks in it is still unused, and so is an empty comprehension
    assert len(_warnings("[1, 2]\n", tmp_path)) == 1
    assert len(_warnings(f'a = load("{a}")\n[save(a, "o") for t in [1] if t > 1]\n', tmp_path)) == 1


def test_long_logic_chains_check_without_recursion():
    assert value(" and ".join(["1 < 2"] * 2000)) is True
    assert value(" or ".join(["1 > 2"] * 2000) + " or 0 == 0") is True
