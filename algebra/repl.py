"""`alg repl`: an interactive session over one persistent `interpreter.Session`.

Behaviour:

- The prompt is `alg> ` for a new entry and `...  ` while an entry continues. An entry
  continues while the parser flags it `incomplete` (an open bracket, a trailing operator,
  `def f(x) =` without a body); a blank line ends it early, showing the syntax error.
  After a trailing operator the next line is joined with a line continuation (`\\`), so
  `a = 1 +` then `2` works as it would in a file written that way.
- Each entry is parsed as `<repl:N>`, checked and run in the session, so names persist
  from entry to entry. A bare expression shows its value; print, info and save act as in
  a recipe. Printed output and warnings go to the REPL's output stream.
- Errors in the recipe (`AlgError`) print as `<repl:N>:line:col: error: ...` with the line
  and a caret, never a traceback. Any other exception is an internal error: a short line
  plus its traceback, and the loop goes on.
- Commands: `:type EXPR`, `:plan EXPR`, `:help [NAME]`, `:load FILE`, `:quit` (`:q`).
  `:type` and `:plan` read headers only; neither runs anything.
- Ctrl-C cancels the entry being typed (or a running one); a second Ctrl-C at an empty
  prompt, end of input, or `:quit` ends the session with status 0.
- On a terminal (no explicit input stream), `readline` gives line editing, name
  completion and a history kept in `$ALG_HISTORY` or `~/.alg_history`.
- Input that is not a terminal (`printf 'x = 1\nx + 1\n' | alg repl`) runs as a script:
  no prompts, values on the output, errors and warnings on stderr, and the status is 1
  if any entry failed (0 otherwise). Ctrl-C stops it with status 130.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from . import ast
from .errors import AlgError, AlgNameError, AlgSyntaxError, AlgTypeError, did_you_mean
from .interpreter import Session
from .io.files import joined, missing, read_source
from .options import Options
from .parser import parse, parse_expr
from .plan import format_plan, plan_tensors
from .registry import in_use
from .signature import Builtin, show
from .source import Source
from .types import Function, type_name
from .values import Closure, Model

PROMPT = "alg> "
CONTINUE = "...  "
HISTORY_LENGTH = 1000
EXPR_COMMANDS = (":type", ":t", ":plan", ":p")  # their argument may continue over lines

COMMANDS = {
    ":type EXPR": "the type of an expression (checkpoints: architecture, tensors, dtype)",
    ":plan EXPR": "the execution plan and predicted peak memory of a checkpoint or save(...)",
    ":help [NAME]": "the functions, or one function's signature and documentation",
    ":load FILE": "run a recipe file in this session",
    ":quit, :q": "leave (so do Ctrl-D and Ctrl-C twice)",
}


class Quit(Exception):
    """Raised by `:quit` to end the loop."""


class Repl:
    """`interactive` (default: whether the input is a terminal) shows prompts and keeps
    going whatever fails; otherwise errors go to `errors` (default stderr) and count."""

    def __init__(self, options: Options, input: TextIO | None = None,
                 output: TextIO | None = None, base_dir: Path | None = None,
                 interactive: bool | None = None, errors: TextIO | None = None):
        self.input = input
        self.output = output if output is not None else sys.stdout
        if interactive is None:
            interactive = _isatty(input if input is not None else sys.stdin)
        self.interactive = interactive
        self.errors = errors if errors is not None else (self.output if interactive else sys.stderr)
        self.failed = 0  # entries that failed
        self.options = dataclasses.replace(options, out=self.write, warn=self._warn)
        self.session = Session(self.options, base_dir, mode="repl")
        self.done = False
        self._text = ""  # the entry typed so far; "" at a fresh prompt
        self._count = 0  # entries so far, for their source names
        self._interrupted = False  # the last thing typed at an empty prompt was Ctrl-C
        self._readline: Any = None

    # ---- output ------------------------------------------------------------------------

    def write(self, text: str) -> None:
        self.output.write(text + "\n")
        self.output.flush()

    def error(self, text: str) -> None:
        """Report a failed entry."""
        self.failed += 1
        self.errors.write(text + "\n")
        self.errors.flush()

    def _warn(self, diagnostic: Any) -> None:
        self.errors.write(diagnostic.format() + "\n")
        self.errors.flush()

    @property
    def prompt(self) -> str:
        if not self.interactive:
            return ""
        return CONTINUE if self._text else PROMPT

    # ---- the loop ----------------------------------------------------------------------

    def loop(self) -> int:
        """Read and evaluate entries until :quit, end of input or a second Ctrl-C. The
        status: 0 on a terminal; in a script, 1 if an entry failed, 130 on Ctrl-C."""
        self._start_readline()
        try:
            while not self.done:
                try:
                    line = self._read(self.prompt)
                    if line is None:  # end of input: finish a pending entry, then leave
                        if self.interactive:
                            self.write("")
                        if self._text:
                            self._finish()
                        break
                    self.feed(line)
                except KeyboardInterrupt:
                    if not self.interactive:
                        return 130
                    self._on_interrupt()
        finally:
            self._save_history()
        return 1 if self.failed and not self.interactive else 0

    def _read(self, prompt: str) -> str | None:
        """One physical line without its newline, or None at end of input."""
        if self._readline is not None:
            try:
                return input(prompt)
            except EOFError:
                return None
        if prompt:
            self.output.write(prompt)
            self.output.flush()
        line = (self.input if self.input is not None else sys.stdin).readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    def _on_interrupt(self) -> None:
        if self._text:
            self._text = ""
            self.write("\n(entry cancelled)")
        elif self._interrupted:
            self.write("")
            self.done = True
        else:
            self._interrupted = True
            self.write("\n(Ctrl-C again, Ctrl-D or :quit to leave)")

    def feed(self, line: str) -> None:
        """Handle one physical line: start, continue, or finish an entry."""
        line = line.rstrip("\r\n")
        self._interrupted = False
        if not self._text:
            if not line.strip():
                return
            self._text = line
        elif not line.strip():  # a blank line ends an entry, complete or not
            self._finish()
            return
        else:
            self._text = self._join(self._text, line)
        if not self._incomplete(self._text):
            self._finish()

    def _finish(self) -> None:
        text, self._text = self._text, ""
        self._count += 1
        name = f"<repl:{self._count}>"
        self._guarded(lambda: self._entry(text, name))

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run one entry; report its errors and keep the session alive."""
        try:
            action()
        except Quit:
            self.done = True
        except AlgError as err:
            self.error(err.format())
        except KeyboardInterrupt:
            if not self.interactive:
                raise  # a script stops
            self.error("interrupted")
        except Exception as exc:  # an internal error: say so, with the traceback
            self.error(f"internal error: {type(exc).__name__}: {exc}\n{traceback.format_exc().rstrip()}")

    def _entry(self, text: str, name: str) -> None:
        if _is_command(text):
            self._command(text, name)
        else:
            self._run(Source(text, name))

    def _run(self, source: Source) -> None:
        checked = self.session.check(source)
        self.session.run_sinks(checked.sinks)

    # ---- multi-line input --------------------------------------------------------------

    def _incomplete(self, text: str) -> bool:
        """True while the entry (or a command's expression) ends too early."""
        if _is_command(text) and text.split(None, 1)[0] not in EXPR_COMMANDS:
            return False
        err = _syntax_error(_code(text))
        return err is not None and bool(getattr(err, "incomplete", False))

    def _join(self, text: str, line: str) -> str:
        """Append a continuation line. A newline inside brackets is whitespace; after a
        trailing operator it would end the statement, so join with a `\\` instead."""
        plain = f"{text}\n{line}"
        err = _syntax_error(_code(plain))
        at_newline = err is not None and err.span is not None and err.span.start <= len(_code(text))
        if err is not None and not getattr(err, "incomplete", False) and at_newline:
            return f"{text} \\\n{line}"
        return plain

    # ---- commands ----------------------------------------------------------------------

    def _command(self, text: str, name: str) -> None:
        word = text.split(None, 1)[0]
        handlers: dict[str, Callable[[str, str], None]] = {
            ":type": self._type, ":t": self._type,
            ":plan": self._plan, ":p": self._plan,
            ":help": self._help, ":h": self._help, ":?": self._help,
            ":load": self._load, ":l": self._load,
            ":quit": self._quit, ":q": self._quit, ":exit": self._quit,
        }
        handler = handlers.get(word)
        if handler is None:
            self.error(f"alg: error: unknown command '{word}'; the commands are:\n{_command_list()}")
            return
        handler(_code(text), name)

    def _quit(self, arg: str, name: str) -> None:
        raise Quit

    def _type(self, arg: str, name: str) -> None:
        """`:type EXPR`: what EXPR is, from headers only."""
        if not arg.strip():
            self.error("usage: :type EXPR")
            return
        node = parse_expr(Source(arg, name))
        checker = self.session.checker
        self.write(describe_type(checker.expr(node, checker.env)))

    def _plan(self, arg: str, name: str) -> None:
        """`:plan EXPR`: plan a checkpoint expression or a save(...), running nothing."""
        if not arg.strip():
            self.error("usage: :plan EXPR   (a checkpoint, or save(m, \"path\"))")
            return
        source = Source(arg, name)
        program = parse(source)
        for stmt in program.stmts:
            if not isinstance(stmt, ast.ExprStmt):
                raise AlgSyntaxError(":plan takes an expression, not a statement", stmt.span)
        checked = self.session.checker.check(program)
        saves = [s for s in checked.sinks if s.kind == "save"]
        if saves:
            self.write(self.session.plan_text(saves))
        elif isinstance(checked.result, Model):
            self.write(format_plan(plan_tensors(checked.result, self.options)))
        else:
            what = type_name(checked.result) if checked.has_result else "nothing"
            raise AlgTypeError(
                f":plan needs a checkpoint or a save(...), not {what}",
                program.stmts[-1].span if program.stmts else None,
            )

    def _help(self, arg: str, name: str) -> None:
        """`:help` lists what there is; `:help NAME` shows one function."""
        if arg.strip():
            self.write(self._help_one(arg.strip()))
        else:
            self.write(self._help_all())

    def _help_all(self) -> str:
        lines = ["builtins:"]
        for b in sorted(in_use().builtins.values(), key=lambda b: b.name):
            lines.append(f"  {b.signature()}")
            lines.append(f"      {_first_sentence(b.doc)}")
        lines.append("prelude:")
        for c in self._prelude():
            lines.append(f"  {signature(c)}")
            comment = _comment_above(c)
            if comment:
                lines.append(f"      {_first_sentence(comment)}")
        lines.append("commands:")
        lines.append(_command_list())
        lines.append("`:help NAME` shows one function; `use NAME` loads a standard library.")
        return "\n".join(lines)

    def _prelude(self) -> list[Closure]:
        values = self.session.checker.prelude_env.values.values()
        return sorted((v for v in values if isinstance(v, Closure)), key=lambda c: c.name)

    def _help_one(self, name: str) -> str:
        env = self.session.checker.env
        try:
            value = env.lookup(name)
        except KeyError:
            raise AlgNameError(f"no name '{name}'{did_you_mean(name, env.names())}") from None
        if isinstance(value, Builtin):
            return f"{value.signature()}  (builtin)\n    {value.doc}"
        if isinstance(value, Closure):
            comment = _comment_above(value)
            where = value.span.location()
            text = f"{signature(value)}  (defined at {where})"
            return text + ("\n" + _indent(comment) if comment else "")
        if isinstance(value, Model):
            return f"{name}: {describe_type(value)}"
        return f"{name}: {describe_type(value)} = {show(value)}"

    def _load(self, arg: str, name: str) -> None:
        """`:load FILE`: run a recipe in this session; its names stay defined."""
        if not arg.strip():
            self.error("usage: :load FILE")
            return
        path = joined(arg.strip(), self.session.checker.base_dir)
        if missing(path):
            self.error(f"alg: error: no such recipe file: '{arg.strip()}'")
            return
        self._run(read_source(path))  # an unreadable file is an AlgIOError

    # ---- readline ----------------------------------------------------------------------

    def _start_readline(self) -> None:
        """Line editing and history, only for a terminal on real stdin."""
        if self.input is not None or not sys.stdin.isatty():
            return
        try:
            import readline
        except ImportError:
            return
        self._readline = readline
        try:
            readline.read_history_file(history_path())
        except OSError:
            pass
        readline.set_history_length(HISTORY_LENGTH)
        readline.set_completer(self._complete)
        readline.set_completer_delims(" \t\n()[],=+-*/:;")
        readline.parse_and_bind("tab: complete")

    def _save_history(self) -> None:
        if self._readline is None:
            return
        try:
            self._readline.write_history_file(history_path())
        except OSError:
            pass

    def _complete(self, prefix: str, state: int) -> str | None:
        names = set(self.session.checker.env.names())
        names.update(c.split()[0].rstrip(",") for c in COMMANDS)
        names.update({":q", ":p", ":t", ":h"})
        matches = sorted(n for n in names if n.startswith(prefix))
        return matches[state] if state < len(matches) else None


# ---- helpers ---------------------------------------------------------------------------


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def history_path() -> str:
    return os.environ.get("ALG_HISTORY") or str(Path.home() / ".alg_history")


def _is_command(text: str) -> bool:
    return text.lstrip().startswith(":")


def _code(text: str) -> str:
    """The alg code of an entry: the whole of it, or what follows a command's name (so
    positions in a command's errors count from the start of its expression)."""
    if not _is_command(text):
        return text
    parts = text.split(None, 1)
    return parts[1] if len(parts) > 1 else ""


def _syntax_error(text: str) -> AlgSyntaxError | None:
    try:
        parse(text, "<repl>")
    except AlgSyntaxError as err:
        return err
    return None


def describe_type(value: Any) -> str:
    """What `:type` prints for a value."""
    if isinstance(value, Model):
        return value.type.describe()
    if isinstance(value, Function):
        return f"Function {signature(value)}"
    return type_name(value)


def signature(f: Any) -> str:
    """`name(p: Type = default, ...)` of a builtin, a def or a lambda."""
    if isinstance(f, Builtin):
        return f.signature()
    if isinstance(f, Closure):
        params = []
        for p in f.params:
            s = p.name + (f": {p.type}" if p.type is not None else "")
            if p.default is not None:
                s += f" = {p.default.span.text()}"
            params.append(s)
        if f.name == "lambda":
            return f"lambda {', '.join(params)}"
        return f"{f.name}({', '.join(params)})"
    return getattr(f, "name", "function")


def _comment_above(c: Closure) -> str:
    """The `#` lines just above a def in its source (without the `#`)."""
    source = c.span.source
    line = c.span.line - 1
    found: list[str] = []
    while line >= 1:
        text = source.line_text(line).strip()
        if not text.startswith("#"):
            break
        found.append(text[1:].strip())
        line -= 1
    return "\n".join(reversed(found))


ABBREVIATIONS = ("e.g", "i.e", "al", "cf", "vs", "approx", "resp")  # "x. " ends no sentence there


def _first_sentence(text: str) -> str:
    """The whole first sentence: up to the first '. ' that does not end an abbreviation
    ("e.g.", "et al.", ...)."""
    flat = " ".join(text.split())
    for match in re.finditer(r"\. ", flat):
        word = flat[: match.start()].rsplit(" ", 1)[-1].lstrip("(")
        if word not in ABBREVIATIONS:
            return flat[: match.start() + 1]
    return flat


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _command_list() -> str:
    return "\n".join(f"  {cmd:<14} {what}" for cmd, what in COMMANDS.items())


__all__ = ["Repl", "describe_type", "signature", "history_path"]
