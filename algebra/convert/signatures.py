"""alg's own names, read from where they are declared, without importing torch.

The converter must know which functions exist, which keywords each takes and their
defaults (to write a keyword only where mergekit's value differs from alg's default),
the language's keywords and the dtypes `save` accepts. Each of these facts lives in one
place in alg; this module reads them from there:

- builtin signatures: the header strings of the `@builtin("name(params)", ...)`
  declarations in the package's modules (builtins.py, layer_builtins.py, methods/,
  reward/, vocab.py). Importing that registry (`algebra.builtins.BUILTINS`) would import
  torch (through types.py), and `alg convert` must not, so the module sources are read
  with Python's `ast` and each header is parsed by alg's own parser, exactly as
  `builtins.builtin()` parses it;
- library functions: the `def`s of stdlib/prelude.alg (always in scope);
- keywords: `parser._KEYWORDS`;
- dtypes: the keys of `types.DTYPE_ALIASES`, read from types.py's source (a literal).

tests/test_convert.py checks the result against the imported registry, so the two
readings cannot disagree.
"""

from __future__ import annotations

import ast as pyast
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

_PKG = Path(__file__).resolve().parent.parent  # algebra/
_REQUIRED = object()


@dataclass(frozen=True)
class Signature:
    name: str
    params: tuple[str, ...]
    defaults: dict[str, Any]  # parameter -> default value, for those that have one
    types: dict[str, str]  # parameter -> its declared type, as written ("Param | List[Param]")

    def default(self, param: str) -> Any:
        if param not in self.params:
            raise KeyError(f"{self.name}() has no parameter '{param}'")
        return self.defaults.get(param, _REQUIRED)

    def has(self, param: str) -> bool:
        return param in self.params

    def per_tensor(self, param: str) -> bool:
        """Whether it takes a per-layer/per-tensor value (ramp, where): its type names Param."""
        return "Param" in self.types.get(param, "")


def _string(node: pyast.AST, env: dict[str, str]) -> str | None:
    """A string expression's value from literals and names bound in env (module string
    constants, a declaring helper's arguments); None when it depends on anything else."""
    if isinstance(node, pyast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, pyast.Name):
        return env.get(node.id)
    if isinstance(node, pyast.BinOp) and isinstance(node.op, pyast.Add):
        a, b = _string(node.left, env), _string(node.right, env)
        return None if a is None or b is None else a + b
    if isinstance(node, pyast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, pyast.FormattedValue):
                if v.conversion != -1 or v.format_spec is not None:
                    return None
                v = v.value
            x = _string(v, env)
            if x is None:
                return None
            parts.append(x)
        return "".join(parts)
    return None


def _builtin_header(call: pyast.AST, env: dict[str, str]) -> str | None:
    if (isinstance(call, pyast.Call) and isinstance(call.func, pyast.Name)
            and call.func.id == "builtin" and call.args):
        return _string(call.args[0], env)
    return None


@cache
def _constants(path: Path) -> dict[str, str]:
    """The module-level string constants of one module of the package: its own literal
    assignments, and names it imports from another module of the package (`from
    ..builtins import TOKENIZER_PARAM`)."""
    tree = pyast.parse(path.read_text(encoding="utf-8"), str(path))
    env: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, pyast.ImportFrom) and node.level > 0 and node.module:
            folder = path.parent
            for _ in range(node.level - 1):
                folder = folder.parent
            source = folder.joinpath(*node.module.split(".")).with_suffix(".py")
            if source.is_file() and _PKG in source.resolve().parents:
                theirs = _constants(source.resolve())
                for alias in node.names:
                    if alias.name in theirs:
                        env[alias.asname or alias.name] = theirs[alias.name]
        elif (isinstance(node, pyast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], pyast.Name)):
            v = _string(node.value, env)
            if v is not None:
                env[node.targets[0].id] = v
    return env


def _headers(path: Path) -> list[str]:
    """The header strings of the `@builtin(...)` declarations of one Python module: on a
    module-level function, or on a function nested in a helper that the module calls with
    literal arguments (`_unary("exp", ...)` declaring `@builtin(f"{name}(x: ...)")`)."""
    tree = pyast.parse(path.read_text(encoding="utf-8"), str(path))
    env = dict(_constants(path))
    out: list[str] = []
    helpers: dict[str, pyast.FunctionDef] = {}
    for node in tree.body:
        if not isinstance(node, pyast.FunctionDef):
            continue
        for dec in node.decorator_list:
            header = _builtin_header(dec, env)
            if header is not None:
                out.append(header)
        inner = [d for f in pyast.walk(node) if isinstance(f, pyast.FunctionDef) and f is not node
                 for d in f.decorator_list
                 if isinstance(d, pyast.Call) and isinstance(d.func, pyast.Name) and d.func.id == "builtin"]
        if inner:
            helpers[node.name] = node
    for node in tree.body:
        call = node.value if isinstance(node, pyast.Expr) else None
        if not (isinstance(call, pyast.Call) and isinstance(call.func, pyast.Name)
                and call.func.id in helpers):
            continue
        helper = helpers[call.func.id]
        local = dict(env)
        for param, arg in zip(helper.args.args, call.args, strict=False):
            v = _string(arg, env)
            if v is not None:
                local[param.arg] = v
        for f in pyast.walk(helper):
            if isinstance(f, pyast.FunctionDef) and f is not helper:
                for dec in f.decorator_list:
                    header = _builtin_header(dec, local)
                    if header is not None:
                        out.append(header)
    return out


@cache
def builtin_signatures() -> dict[str, Signature]:
    """name -> Signature of every builtin the package declares."""
    from .. import ast
    from ..parser import parse

    sigs: dict[str, Signature] = {}
    for path in sorted(_PKG.rglob("*.py")):
        if "convert" in path.relative_to(_PKG).parts:
            continue
        text = path.read_text(encoding="utf-8")
        if "@builtin(" not in text:
            continue
        for header in _headers(path):
            program = parse(f"def {header} = none", name=f"<builtin {header.split('(')[0]}>")
            d = program.stmts[0]
            assert isinstance(d, ast.Def)
            defaults = {p.name: ast.literal_value(p.default) for p in d.params if p.default is not None}
            types = {p.name: str(p.type) for p in d.params if p.type is not None}
            sigs[d.name] = Signature(d.name, tuple(p.name for p in d.params), defaults, types)
    return sigs


@cache
def library_functions() -> tuple[str, ...]:
    """The functions of stdlib/prelude.alg, in scope in every recipe."""
    from .. import ast
    from ..parser import parse
    from ..resources import stdlib_dir

    program = parse((stdlib_dir() / "prelude.alg").read_text(encoding="utf-8"), "prelude.alg")
    return tuple(s.name for s in program.stmts if isinstance(s, ast.Def))


@cache
def keywords() -> tuple[str, ...]:
    from ..parser import _KEYWORDS

    return tuple(sorted(_KEYWORDS))


@cache
def function_names() -> frozenset[str]:
    """Every name a recipe variable must not take: builtins and library functions."""
    return frozenset(builtin_signatures()) | frozenset(library_functions())


@cache
def save_dtypes() -> tuple[str, ...]:
    """The dtype names `save(..., dtype=)` accepts: types.DTYPE_ALIASES's keys."""
    tree = pyast.parse((_PKG / "types.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (isinstance(node, pyast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], pyast.Name) and node.targets[0].id == "DTYPE_ALIASES"):
            return tuple(pyast.literal_eval(node.value))
    raise RuntimeError("algebra/types.py defines no literal DTYPE_ALIASES")


def signature(name: str) -> Signature:
    return builtin_signatures()[name]


__all__ = ["Signature", "builtin_signatures", "function_names", "keywords", "library_functions",
           "save_dtypes", "signature"]
