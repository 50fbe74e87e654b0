"""Parser: golden ASTs for tests/golden/parse/*.alg, and syntax errors.

Set ALG_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change; review
the diff before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from algebra import ast
from algebra.errors import AlgSyntaxError
from algebra.parser import parse, parse_expr
from algebra.source import Source

GOLDEN = Path(__file__).parent / "golden" / "parse"
CASES = sorted(GOLDEN.glob("*.alg"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_ast(path: Path):
    got = ast.dump(parse(Source(path.read_text(), path.name))) + "\n"
    expected = path.with_suffix(".ast")
    if os.environ.get("ALG_UPDATE_GOLDEN"):
        expected.write_text(got)
    assert got == expected.read_text()


def test_golden_cases_exist():
    assert len(CASES) >= 3


def test_precedence_and_associativity():
    e = parse_expr("a - b - c")
    assert isinstance(e, ast.BinOp) and e.op == "-" and isinstance(e.left, ast.BinOp)
    e = parse_expr("a + b * c")
    assert e.op == "+" and isinstance(e.right, ast.BinOp) and e.right.op == "*"
    e = parse_expr("-a * b")
    assert e.op == "*" and isinstance(e.left, ast.UnaryOp)


def test_conditions_nest_like_python():
    e = parse_expr("not a < b and c or d if e else f")
    assert isinstance(e, ast.IfExp) and e.cond == ast.Name("e", span=e.span)
    assert isinstance(e.body, ast.BoolOp) and e.body.op == "or"
    assert isinstance(e.body.left, ast.BoolOp) and e.body.left.op == "and"
    assert isinstance(e.body.left.left, ast.Not) and isinstance(e.body.left.left.operand, ast.Compare)
    e = parse_expr("a + 1 < b * 2 == c")  # arithmetic binds tighter; one chain of two ops
    assert isinstance(e, ast.Compare) and e.ops == ("<", "==") and isinstance(e.operands[0], ast.BinOp)


def test_logic_chains_are_one_nesting_level_and_not_is_one_each():
    from algebra.parser import MAX_NESTING

    n = 5 * MAX_NESTING
    e = parse_expr(" and ".join(["x"] * n))  # one chain, however long
    assert isinstance(e, ast.BoolOp) and e.op == "and"
    assert isinstance(parse_expr(" or ".join(["x"] * n)), ast.BoolOp)
    with pytest.raises(AlgSyntaxError, match="nested too deeply"):
        parse_expr("not " * (MAX_NESTING + 5) + "x")
    with pytest.raises(AlgSyntaxError, match="nested too deeply"):
        parse_expr("1 if x else " * (MAX_NESTING + 5) + "2")


def test_numbers_keep_int_and_float():
    assert parse_expr("3").value == 3 and isinstance(parse_expr("3").value, int)
    assert parse_expr("1e-3").value == pytest.approx(0.001)
    assert parse_expr(".5").value == 0.5


def test_newlines_inside_brackets_are_not_separators():
    program = parse("x = f(a,\n  b)\ny = [1,\n 2]")
    assert len(program.stmts) == 2


def test_semicolons_and_comments():
    program = parse("a = 1; b = 2  # two\n# c = 3\n;;")
    assert [s.name for s in program.stmts] == ["a", "b"]


def test_spans_point_at_source():
    src = Source("x = merge(a, b, 0.3)", "t.alg")
    call = parse(src).stmts[0].value
    assert (call.span.line, call.span.col) == (1, 5)
    assert call.args[2].span.text() == "0.3"


@pytest.mark.parametrize(
    "text, message, col, incomplete",
    [
        ("a = (1 +", "unexpected end of input; expected an expression", 8, True),
        ("save(a b)", "unexpected 'b'; expected ')' or ','", 8, False),
        ("x = [1 2]", "unexpected '2'; expected ',' or ']'", 8, False),
        ("a = 1 2", "unexpected '2'", 7, False),
        ("a = 'x", "unterminated string", 5, False),
        ("a = 1 $ 2", "unexpected character '$'", 7, False),
        ("f(a=1, 2)", "positional argument follows keyword argument", 8, False),
        ("def f(a=1, b) = a", "parameter 'b' without a default follows one with a default", 12, False),
        ("def f(a, a) = a", "parameter 'a' appears twice", 10, False),
        ("f(x=1, x=2)", "keyword argument 'x' given twice", 8, False),
        ("a = 1 < < 2", "unexpected '<'; expected an expression", 9, False),
        ("a = x if c", "expected 'else'", 10, True),
        ("a = x if c else", "expected an expression", 15, True),
        ("[x for x in xs if]", "unexpected ']'; expected an expression", 18, False),
        ("and = 1", "'and' is a keyword and cannot be used as a name", 1, False),
    ],
)
def test_syntax_errors(text, message, col, incomplete):
    with pytest.raises(AlgSyntaxError) as info:
        parse(Source(text, "bad.alg"))
    err = info.value
    assert message in err.message
    assert err.span.col == col
    assert getattr(err, "incomplete", False) == incomplete
    assert err.format().startswith(f"bad.alg:1:{col}: error: ")
