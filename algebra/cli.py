"""`alg`: the command line, a thin shell over `interpreter.Session`.

    alg run FILE [--set name=value]... [--device D] [--float64] [--chunk N] [--threads N] [--force] [--ray [C]]
    alg check FILE      types, names, shapes and dtypes from headers; reads no weight
    alg plan FILE       the steps and the predicted peak memory
    alg score FILE NAME --data D --out O [--field ROLE=COL] [--split S] [--force]
                        score D's rows (a data file or dataset folder) with the recipe's reward NAME
    alg repl            an interactive session (piped input: a script, no prompts)
    alg demo [--dir D]  build small demo checkpoints and run the example recipes
    alg convert mergekit CONFIG.yml [-o OUT.alg]   a mergekit config as an alg recipe
    alg cache [clear [NAME]...]   the on-disk caches: where, how big; empty them

Each command takes only the options that mean something to it: check and plan take run's
(they check and plan that run), score takes what changes its scores, repl and demo what
changes their runs (no --set: the REPL defines names itself, the demo runs fixed recipes).

Exit status: 0 on success, 1 for an error in the recipe or its inputs (printed as
`file:line:col: error: ...` without a traceback), 2 for bad command-line usage (printed
after the usage of the command it concerns, saying what would be right), 128 + the
signal's number for SIGINT, SIGTERM and SIGHUP (a save in progress leaves nothing behind).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .caches import WHERE
from .errors import AlgError, AlgUsageError, Note, did_you_mean
from .options import (
    DEVICE_CHOICES,
    MIN_CHUNK_ELEMS,
    RAY_CHOICES,
    RAY_ENV,
    THREADS_CHOICES,
    THREADS_ENV,
    Options,
    check_device,
    check_ray,
    check_threads,
    chunk_problem,
)
from .source import Source
from .version import __version__

UsageError = AlgUsageError  # a bad option or argument: exit status 2


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


def entry() -> int:
    """The `alg` process (the console script, `python -m algebra`): `main`, then, as the
    process is about to exit, its objects frozen out of the garbage collector
    (`gc.freeze`). Everything alg writes is closed by then and atexit handlers still run;
    what it saves is the interpreter's final collections over every object of torch and
    transformers, about a second of CPU time after a run that imported them. Not for
    `main` called in process (tests, embedding), whose objects live on. Before anything
    loads torch, OpenMP's workers are told to spin only briefly between parallel regions
    (`runconfig.quiet_openmp`)."""
    import gc

    from .runconfig import quiet_openmp

    quiet_openmp()
    code = main()
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    import signal

    old = _install_signal_handlers()
    try:
        return _main(argv)
    finally:  # main() may be called in process (tests, embedding): give the handlers back
        for sig, handler in old.items():
            signal.signal(sig, handler)


# ---- --set -----------------------------------------------------------------------------


def _set_item(item: str) -> tuple[str, Any, bool]:
    """`name=value` as (name, value, whether value was an alg literal)."""
    name, sep, text = item.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise UsageError(f"--set expects name=value, got '{item}'")
    from .ast import literal_value
    from .parser import parse_expr

    try:
        return name, literal_value(parse_expr(text, "<--set>")), True
    except AlgError:
        return name, text, False


def parse_set(item: str) -> tuple[str, Any]:
    """`name=value`: value is an alg literal (0.3, "x", true, [1, 2]); anything that does
    not parse as one is taken as a string, so --set out=models/x needs no quotes."""
    name, value, _ = _set_item(item)
    return name, value


def _kind(value: Any) -> str | None:
    """What a recipe's literal is, in the words of a --set error; None: any value will do."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, tuple):
        return "a list"
    return None  # a string or none: a bare word is a fine replacement


def _check_set_values(source: Source, items: list[str]) -> None:
    """A --set value that is not an alg literal (so taken as a string) where the recipe
    assigns that name a number, a Bool or a list is a mistyped value: say so, at --set."""
    from .ast import Assign, literal_value
    from .parser import parse

    words = {}  # name -> (the text given, whether it is an alg literal)
    for item in items:
        name, _, literal = _set_item(item)
        words[name] = (item.partition("=")[2], literal)
    if all(literal for _, literal in words.values()):
        return
    try:
        program = parse(source)
    except AlgError:
        return  # checking the recipe will say what is wrong with it
    for stmt in program.stmts:
        if not isinstance(stmt, Assign) or stmt.name not in words or words[stmt.name][1]:
            continue
        try:
            kind = _kind(literal_value(stmt.value))
        except AlgError:
            continue  # not a literal: its type is checked where it is used
        if kind is not None:
            text = words[stmt.name][0]
            example = stmt.value.span.text()
            raise UsageError(
                f"--set {stmt.name}={text}: the value given with --set is not {kind}; the "
                f"recipe's {stmt.name} is {kind}, like --set {stmt.name}={example}",
                notes=[Note(f"the recipe's {stmt.name}", stmt.value.span)],
            )


def _check_overrides(session: Any, options: Options) -> None:
    """Every --set name must be one the recipe uses."""
    known = [n for n in session.checker.env.values if n not in options.overrides]
    for name in options.overrides:
        if name not in session.checker.used_overrides:
            raise UsageError(f"--set {name}: the recipe has no name '{name}'{did_you_mean(name, known)}")


def _set_blame(err: AlgError, items: list[str]) -> AlgError:
    """An error at a use of a name whose --set value was taken as a string (not an alg
    literal) is the --set's: a usage error that says so, with the recipe's error as a note."""
    if err.span is None:
        return err
    for item in items:
        name, value, literal = _set_item(item)
        if not literal and err.span.text() == name:
            return UsageError(
                f"--set {name}={value}: the value given with --set is not a number, true/false, "
                f"none or a list, so {name} is the string \"{value}\", which the recipe cannot use here",
                notes=[Note(err.message, err.span), *err.notes],
            )
    return err


# ---- the parser ------------------------------------------------------------------------


def _device(text: str) -> str:
    try:
        return check_device(text)
    except AlgUsageError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _chunk(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of elements") from None
    problem = chunk_problem(n, "--chunk")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return n


def _ray(text: str) -> str:
    try:
        return check_ray(text)
    except AlgUsageError as e:
        hint = ("; --ray takes an optional value, so put it after FILE or give it one "
                "(alg run --ray local FILE)") if text.endswith(".alg") else ""
        raise argparse.ArgumentTypeError(e.message.removeprefix("--ray: ") + hint) from None


def _threads(text: str) -> int | str:
    try:
        return check_threads(text)
    except AlgUsageError as e:
        raise argparse.ArgumentTypeError(e.message.removeprefix("--threads: ")) from None


def _ray_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="local", default=None, type=_ray, metavar="CLUSTER",
                   help=f"score on a Ray cluster: {RAY_CHOICES} (bare --ray: local; default "
                        f"${RAY_ENV}, else off; needs pip install 'algebra[ray]')")


def _device_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=_device,
                   help=f"{DEVICE_CHOICES} (default auto: cuda if there is one)")


def _compute_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--float64", action="store_true", help="compute in float64 instead of float32")
    p.add_argument("--chunk", type=_chunk, default=None, metavar="N",
                   help=f"elements per streamed chunk (default {Options.chunk_elems}, at least {MIN_CHUNK_ELEMS})")
    p.add_argument("--threads", type=_threads, default=None, metavar="N",
                   help=f"torch's CPU threads: {THREADS_CHOICES} (default ${THREADS_ENV}, else auto)")


def _set_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a top-level name of the recipe (repeatable)")


def _run_opts(p: argparse.ArgumentParser, force: str) -> None:
    """run's options; check and plan take them too, to check and plan that run."""
    p.add_argument("--force", action="store_true", help=force)
    _set_opt(p)
    _device_opt(p)
    _compute_opts(p)
    _ray_opt(p)


DESCRIPTION = """\
alg: model algebra. Recipes merge checkpoints (lerp, slerp, TIES, DARE, Model Stock and
the rest of mergekit's methods, on any Hugging Face architecture) and compose reward
models (transform, combine, score, evaluate, hand to a trainer), checked against the
checkpoints' headers before any weight is read."""

EPILOG = f"""\
`alg COMMAND --help` describes a command. Exit status: 0 on success, 1 for an error in
a recipe or its inputs, 2 for bad usage. Caches (file hashes, reward scores, generated
samples) live in {WHERE}: see `alg cache`."""


def _progress_flags(p: argparse.ArgumentParser) -> None:
    """Progress bars on stderr (algebra/progress.py): shown when stderr is a terminal."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_const", const="on", default="auto",
                   help="show progress bars even when stderr is not a terminal")
    g.add_argument("--quiet", dest="progress", action="store_const", const="off",
                   help="show no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alg", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"alg {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        p.set_defaults(parser=p)
        return p

    run = command("run", "run a recipe: its saves, scores, evaluations and prints")
    run.add_argument("file", metavar="FILE")
    _run_opts(run, "overwrite existing outputs")
    _progress_flags(run)
    chk = command("check", "check a recipe against checkpoint headers; reads no weight")
    chk.add_argument("file", metavar="FILE")
    _run_opts(chk, "check as for run --force: existing outputs are no error")
    pl = command("plan", "show the steps (merges, reward scoring) and the predicted peak memory")
    pl.add_argument("file", metavar="FILE")
    pl.add_argument("--verbose", "-v", action="store_true", help="list every step")
    _run_opts(pl, "plan as for run --force")
    sc = command("score", "score a data set with a reward the recipe defines")
    sc.add_argument("file", metavar="FILE")
    sc.add_argument("name", metavar="NAME", help="the recipe's name for the reward")
    sc.add_argument("--data", required=True, metavar="PATH",
                    help="the rows to score, as responses() reads them: a JSONL, JSON, CSV or Parquet "
                         "file, a datasets save_to_disk folder or a Hub-layout folder")
    sc.add_argument("--field", action="append", default=[], metavar="ROLE=COLUMN",
                    help="the column giving prompt or response, as responses(prompt=..., response=...) "
                         "names it (repeatable; default: columns 'prompt' and 'response')")
    sc.add_argument("--split", default=None, metavar="NAME",
                    help="the split of a dataset folder of several, as responses(split=...)")
    sc.add_argument("--out", required=True, help="JSONL output: the rows with a 'reward' field")
    sc.add_argument("--force", action="store_true", help="replace an existing --out file")
    _set_opt(sc)
    _device_opt(sc)
    _compute_opts(sc)
    _ray_opt(sc)
    _progress_flags(sc)
    rp = command("repl", "an interactive session; piped input runs as a script")
    _device_opt(rp)
    _compute_opts(rp)
    demo = command("demo", "build small demo checkpoints and run the example recipes")
    demo.add_argument("--dir", default="alg-demo", help="where to build (default ./alg-demo)")
    _device_opt(demo)
    _compute_opts(demo)
    conv = command("convert", "translate another tool's merge config into a recipe")
    conv.add_argument("format", choices=["mergekit"], help="the config's tool")
    conv.add_argument("file", metavar="FILE", help="the config file (YAML)")
    conv.add_argument("-o", "--output", metavar="OUT.alg", help="write here instead of stdout")
    from .caches import CACHES

    cache = command("cache", "show the on-disk caches and their sizes; `alg cache clear` empties them")
    cache.description += (f" The caches live in one folder: {WHERE}. Each is a convenience: "
                          "deleting it costs only recomputation.")
    cache_sub = cache.add_subparsers(dest="cache_command", title="commands", metavar="clear")
    clear = cache_sub.add_parser("clear", help="delete caches (all, or those named)",
                                 description="Delete the named caches, or all of them.")
    clear.set_defaults(parser=clear)
    clear.add_argument("names", nargs="*", metavar="NAME",
                       help="one of " + ", ".join(c.name for c in CACHES) + " (default: all)")
    return ap


# ---- inputs and options ----------------------------------------------------------------


def _input_file(path: str, what: str) -> Path:
    """A file named on the command line: a missing one or a folder is a usage error."""
    from .io.files import missing

    if missing(path):
        raise UsageError(f"no such {what}: '{path}'")
    if os.path.isdir(path):
        inside = sorted(p.name for p in Path(path).glob("*.alg")) if what == "recipe file" else []
        hint = f"; it holds {', '.join(inside)}" if inside else ""
        raise UsageError(f"'{path}' is a directory, not a {what}{hint}")
    return Path(path)


def _data_options(args: argparse.Namespace) -> dict[str, str]:
    """score's --data (a file or a dataset folder: read as responses() reads it, by
    reward/formats.py) and --field ROLE=COLUMN (responses()'s prompt= and response=)."""
    from .io.files import missing
    from .reward.formats import RESPONSE_ROLES

    if missing(args.data):
        raise UsageError(f"no such data file or folder: '{args.data}'")
    fields: dict[str, str] = {}
    for item in args.field:
        role, sep, col = item.partition("=")
        role = role.strip()
        if not sep or not col:
            raise UsageError(f"--field expects ROLE=COLUMN (like --field prompt=question), got '{item}'")
        if role not in RESPONSE_ROLES:
            raise UsageError(f"--field {item}: the roles are {_words(list(RESPONSE_ROLES))}, not '{role}'"
                             f"{did_you_mean(role, RESPONSE_ROLES)}")
        if role in fields:
            raise UsageError(f"--field {item}: {role} is already given as --field {role}={fields[role]}")
        fields[role] = col
    return fields


def options_from(args: argparse.Namespace) -> Options:
    kw: dict[str, Any] = {}
    if getattr(args, "chunk", None) is not None:
        kw["chunk_elems"] = args.chunk
    return Options(
        device=getattr(args, "device", "auto"),
        force=getattr(args, "force", False),
        compute_dtype="float64" if getattr(args, "float64", False) else "float32",
        overrides=dict(parse_set(s) for s in getattr(args, "set", [])),
        progress=getattr(args, "progress", "auto"),  # --progress/--quiet on run and score
        ray=getattr(args, "ray", None),  # None: $ALG_RAY
        threads=getattr(args, "threads", None),  # None: $ALG_THREADS
        **kw,
    )


# ---- the commands ----------------------------------------------------------------------


def convert(args: argparse.Namespace) -> int:
    """`alg convert mergekit CONFIG.yml`: no torch, no checkpoint read; errors point into
    the YAML like recipe errors do."""
    from .convert import mergekit_to_alg
    from .io.files import read_text

    path = _input_file(args.file, "config file")
    text = mergekit_to_alg(read_text(path, args.file, what="config file"), name=args.file)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cache(args: argparse.Namespace) -> int:
    """`alg cache`: each cache's size; `alg cache clear [NAME]...`: delete them."""
    from .caches import CACHES, cache_dir, clear, usage
    from .types import human_bytes

    if args.cache_command == "clear":
        names = [c.name for c in CACHES]
        for name in args.names:
            if name not in names:
                raise UsageError(f"no cache named '{name}'; the caches are {_words(names)}")
        freed = 0
        for name in args.names or [c.name for c in CACHES]:
            size = clear(name)
            freed += size
            print(f"cleared {name} ({human_bytes(size)})")
        print(f"freed {human_bytes(freed)} in {cache_dir()}")
        return 0
    print(f"caches in {cache_dir()}")
    total = 0
    for c in CACHES:
        size, files = usage(c.name)
        total += size
        print(f"  {c.name:<12} {human_bytes(size):>10}  {files:>6} file(s)  {c.holds}")
    print(f"  {'total':<12} {human_bytes(total):>10}")
    return 0


def repl(args: argparse.Namespace, options: Options) -> int:
    from .repl import Repl

    return Repl(options).loop()


def demo(args: argparse.Namespace, options: Options) -> int:
    from .demo import run_demo

    return run_demo(Path(args.dir), options)


def recipe(args: argparse.Namespace, options: Options) -> int:
    """run, check, plan and score: check the recipe (with --set), then act."""
    from .io.files import read_source

    source = read_source(_input_file(args.file, "recipe file"))  # unreadable: AlgIOError
    _check_set_values(source, args.set)
    if args.command == "score":
        fields = _data_options(args)
    from .interpreter import Session  # after the usage checks: it imports torch

    session = Session(options, source.folder, mode="file")
    try:
        checked = session.check(source)
    except AlgError as e:
        raise _set_blame(e, args.set) from None
    _check_overrides(session, options)
    if args.command == "run":
        session.run_sinks(checked.sinks)
    elif args.command == "check":
        kinds = [s.kind for s in checked.sinks]
        summary = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) or "no sinks"
        print(f"{source.name}: ok ({summary})")
    elif args.command == "plan":
        print(session.plan_text(checked.sinks, verbose=args.verbose))
    elif args.command == "score":
        from .reward.engine import score_command

        score_command(session, args.name, Path(args.data), Path(args.out),  # the recipe's sinks do not run
                      fields=fields, split=args.split)
    return 0


def _parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; an argument the command does not take is an error of that command,
    which names the commands that do take it."""
    args, extra = ap.parse_known_args(argv)
    if extra:
        parser = args.parser
        takers = [name for name, p in _commands(ap).items()
                  if p is not parser and extra[0] in p._option_string_actions]
        why = f" ({_words(['alg ' + t for t in takers])} take{'s' if len(takers) == 1 else ''} it)" if takers else ""
        parser.error(f"{extra[0]}: not an option of {parser.prog}{why}" if extra[0].startswith("-")
                     else f"unrecognized arguments: {' '.join(extra)}")
    return args


def _commands(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _main(argv: list[str] | None) -> int:
    ap = build_parser()
    args = _parse(ap, argv)
    try:
        if args.command == "convert":
            return convert(args)
        if args.command == "cache":
            return cache(args)
        options = options_from(args)
        if args.command == "repl":
            return repl(args, options)
        if args.command == "demo":
            return demo(args, options)
        return recipe(args, options)
    except AlgUsageError as e:
        parser = getattr(args, "parser", ap)
        parser.print_usage(sys.stderr)
        print(e.format().replace("alg: error:", f"{parser.prog}: error:", 1), file=sys.stderr)
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
