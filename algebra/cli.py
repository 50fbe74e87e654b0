"""`alg`: the command line, a thin shell over `interpreter.Session`.

    alg run FILE [--set name=value]... [--device cpu|cuda|auto] [--force]
    alg check FILE      types, names, shapes and dtypes from headers; reads no weight
    alg plan FILE       the steps and the predicted peak memory
    alg score FILE NAME --data D --out O   score D's rows with the recipe's reward NAME
    alg repl            an interactive session
    alg demo [--dir D]  build small demo checkpoints and run the example recipes
    alg convert mergekit CONFIG.yml [-o OUT.alg]   a mergekit config as an alg recipe

Exit status: 0 on success, 1 for an error in the recipe or its inputs (printed as
`file:line:col: error: ...` without a traceback), 2 for bad command-line usage, 128 + the
signal's number for SIGINT, SIGTERM and SIGHUP (a save in progress leaves nothing behind).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AlgError
from .options import MIN_CHUNK_ELEMS, Options, chunk_problem
from .source import Source


class UsageError(Exception):
    pass


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the main thread is, so a save in progress cleans up
    exactly as it does for SIGINT (its temporary folder is removed). Not a
    KeyboardInterrupt: the REPL, which survives ^C, must still stop."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _install_signal_handlers() -> dict:
    """Handle SIGTERM and SIGHUP like SIGINT; returns the handlers they replace."""
    import signal

    old = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                old[sig] = signal.signal(sig, _on_signal)
            except (ValueError, OSError):  # not the main thread: leave the default
                pass
    return old


def main(argv: list[str] | None = None) -> int:
    import signal

    old = _install_signal_handlers()
    try:
        return _main(argv)
    finally:  # main() may be called in process (tests, embedding): give the handlers back
        for sig, handler in old.items():
            signal.signal(sig, handler)


def parse_set(item: str) -> tuple[str, Any]:
    """`name=value`: value is an alg literal (0.3, "x", true, [1, 2]); anything that does
    not parse as one is taken as a string, so --set out=models/x needs no quotes."""
    name, sep, text = item.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise UsageError(f"--set expects name=value, got '{item}'")
    from .ast import literal_value
    from .parser import parse_expr

    try:
        return name, literal_value(parse_expr(text, "<--set>"))
    except AlgError:
        return name, text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--float64", action="store_true", help="compute in float64 instead of float32")
    p.add_argument("--chunk", type=int, default=None, metavar="N",
                   help=f"elements per streamed chunk (default {Options.chunk_elems}, at least {MIN_CHUNK_ELEMS})")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a top-level name of the recipe (repeatable)")


def _progress_flags(p: argparse.ArgumentParser) -> None:
    """Progress bars on stderr (algebra/progress.py): shown when stderr is a terminal."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_const", const="on", default="auto",
                   help="show progress bars even when stderr is not a terminal")
    g.add_argument("--quiet", dest="progress", action="store_const", const="off",
                   help="show no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alg", description="alg: model algebra for merging checkpoints.")
    ap.add_argument("--version", action="version", version=f"alg {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a recipe")
    run.add_argument("file")
    run.add_argument("--force", action="store_true", help="overwrite existing output folders")
    _progress_flags(run)
    _common(run)
    chk = sub.add_parser("check", help="check a recipe against checkpoint headers; reads no weight")
    chk.add_argument("file")
    _common(chk)
    pl = sub.add_parser("plan", help="show the execution plan and predicted peak memory")
    pl.add_argument("file")
    pl.add_argument("--verbose", "-v", action="store_true", help="list every step")
    pl.add_argument("--force", action="store_true", help="plan as if --force were given to run")
    _common(pl)
    sc = sub.add_parser("score", help="score a data set with a reward the recipe defines")
    sc.add_argument("file")
    sc.add_argument("name", help="the recipe's name for the reward")
    sc.add_argument("--data", required=True, help="JSONL rows with 'prompt' and 'response'")
    sc.add_argument("--out", required=True, help="JSONL output: the rows with a 'reward' field")
    _progress_flags(sc)
    _common(sc)
    rp = sub.add_parser("repl", help="interactive session")
    _common(rp)
    demo = sub.add_parser("demo", help="build demo checkpoints and run the example recipes")
    demo.add_argument("--dir", default="alg-demo", help="where to build (default ./alg-demo)")
    _common(demo)
    conv = sub.add_parser("convert", help="translate another tool's merge config into a recipe")
    conv.add_argument("format", choices=["mergekit"], help="the config's tool")
    conv.add_argument("file", help="the config file (YAML)")
    conv.add_argument("-o", "--output", metavar="OUT.alg", help="write here instead of stdout")
    return ap


def convert(args: argparse.Namespace) -> int:
    """`alg convert mergekit CONFIG.yml`: no torch, no checkpoint read; errors point into
    the YAML like recipe errors do."""
    from .convert import mergekit_to_alg
    from .io.files import missing, read_text

    if missing(args.file):
        raise UsageError(f"no such config file: '{args.file}'")
    text = mergekit_to_alg(read_text(Path(args.file), args.file, what="config file"), name=args.file)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def options_from(args: argparse.Namespace) -> Options:
    overrides = dict(parse_set(s) for s in args.set)
    kw: dict[str, Any] = {}
    if args.chunk is not None:
        problem = chunk_problem(args.chunk, "--chunk")
        if problem:
            raise UsageError(problem)
        kw["chunk_elems"] = args.chunk
    return Options(
        device=args.device,
        force=getattr(args, "force", False),
        compute_dtype="float64" if args.float64 else "float32",
        overrides=overrides,
        progress=getattr(args, "progress", "auto"),  # --progress/--quiet on run and score
        **kw,
    )


def _load(path: str) -> Source:
    from .io.files import missing

    if missing(path):
        raise UsageError(f"no such recipe file: '{path}'")
    return Source.from_file(path)  # a folder, a device, bad UTF-8...: an AlgIOError


def _check_overrides(session: Any, options: Options) -> None:
    for name in options.overrides:
        if name not in session.checker.used_overrides:
            raise UsageError(f"--set {name}: the recipe has no name '{name}'")


def _main(argv: list[str] | None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.command == "convert":
            return convert(args)
        options = options_from(args)
        if args.command == "repl":
            from .repl import Repl

            return Repl(options).loop()
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.dir), options)
        source = _load(args.file)
        from .interpreter import Session  # after the usage checks: it imports torch

        session = Session(options, source.folder, mode="file")
        if args.command == "run":
            checked = session.check(source)
            _check_overrides(session, options)
            session.run_sinks(checked.sinks)
        elif args.command == "check":
            checked = session.check(source)
            _check_overrides(session, options)
            kinds = [s.kind for s in checked.sinks]
            summary = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) or "no sinks"
            print(f"{source.name}: ok ({summary})")
        elif args.command == "score":
            from .reward.engine import score_command

            session.check(source)  # the recipe's own sinks do not run
            _check_overrides(session, options)
            score_command(session, args.name, Path(args.data), Path(args.out))
        elif args.command == "plan":
            checked = session.check(source)
            _check_overrides(session, options)
            print(session.plan_text(checked.sinks, verbose=args.verbose))
        return 0
    except UsageError as e:
        ap.print_usage(sys.stderr)
        print(f"alg: error: {e}", file=sys.stderr)
        return 2
    except AlgError as e:
        print(e.format(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alg: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except Terminated as e:
        import signal

        print(f"alg: stopped by {signal.Signals(e.signum).name}; no partial output was left behind",
              file=sys.stderr)
        return 128 + e.signum


__all__ = ["main", "parse_set"]
