"""The REPL, driven through its input stream; one test runs `python -m algebra repl`."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from algebra.errors import Diagnostic
from algebra.options import Options
from algebra.repl import CONTINUE, PROMPT, Repl, history_path


def session(text: str, base_dir: Path | None = None) -> tuple[int, str, Repl]:
    """The REPL as on a terminal: prompts shown, errors on the same output."""
    out = io.StringIO()
    repl = Repl(Options(device="cpu"), input=io.StringIO(text), output=out, base_dir=base_dir,
                interactive=True)
    status = repl.loop()
    return status, out.getvalue(), repl


def run(text: str, base_dir: Path | None = None) -> str:
    status, out, _ = session(text, base_dir)
    assert status == 0
    return out


@pytest.fixture
def models(family) -> Path:
    """The folder that holds base/, math/, rm/, rl1/, rl2/: load("base") works from it."""
    return family["base"].parent


# ---- entries -----------------------------------------------------------------------------


def test_arithmetic_is_shown(tmp_path):
    assert run("1 + 2\n", tmp_path) == f"{PROMPT}3\n{PROMPT}\n"


def test_values_render_as_alg(tmp_path):
    out = run('"a" + "b"\n[1, 2.5, true, none]\n1 / 2\n', tmp_path)
    assert '"ab"\n' in out
    assert "[1, 2.5, true, none]\n" in out
    assert "0.5\n" in out


def test_assignment_prints_nothing_and_persists(tmp_path):
    out = run("x = 20\nx + 22\n", tmp_path)
    assert out == f"{PROMPT}{PROMPT}42\n{PROMPT}\n"


def test_definition_used_on_a_later_line(tmp_path):
    out = run("def twice(x: Scalar, k: Scalar = 2) = k * x\ny = twice(21)\ny\n", tmp_path)
    assert "42\n" in out


def test_multi_line_call(models):
    text = 'm = merge(load("rm"),\n    load("math"),\n    0.5)\nm\n'
    out = run(text, models)
    assert out.count(CONTINUE) == 2
    assert "Checkpoint(LlamaForSequenceClassification, " in out
    assert "error" not in out


def test_multi_line_list_and_comment(tmp_path):
    out = run("xs = [1,  # first\n  2,\n  3]\nlen(xs)\n", tmp_path)
    assert out.count(CONTINUE) == 2
    assert "3\n" in out


def test_trailing_operator_continues(tmp_path):
    out = run("x = 1 +\n  2\nx * 10\n", tmp_path)
    assert out.count(CONTINUE) == 1
    assert "30\n" in out
    assert "error" not in out


def test_def_body_on_the_next_line(tmp_path):
    out = run("def f(t: Scalar) =\n  t * 3\nf(5)\n", tmp_path)
    assert "15\n" in out
    assert "error" not in out


def test_print_and_info_go_to_the_output(models):
    out = run('print(1 + 1)\nprint("text")\ninfo(load("base"))\n', models)
    assert f"{PROMPT}2\n" in out
    assert f"{PROMPT}text\n" in out
    assert "architecture: LlamaForCausalLM" in out


def test_save_runs(models, tmp_path, read):
    target = tmp_path / "merged"
    out = run(f'save(lerp(load("base"), load("math"), 0.5), "{target}")\n', models)
    assert "wrote " in out and "21 tensors" in out
    assert "model.norm.weight" in read(target)


def test_warnings_go_to_the_output(tmp_path):
    out = io.StringIO()
    repl = Repl(Options(device="cpu"), input=io.StringIO(""), output=out, base_dir=tmp_path, interactive=True)
    repl.options.warn(Diagnostic("careful"))
    assert out.getvalue() == "alg: warning: careful\n"


# ---- errors ------------------------------------------------------------------------------


def test_unknown_name_error_has_position_and_caret_not_traceback(tmp_path):
    out = run("lerrp(1)\n1 + 1\n", tmp_path)
    assert "<repl:1>:1:1: error: unknown name 'lerrp'; did you mean 'lerp'?\n" in out
    assert "    lerrp(1)\n    ^^^^^\n" in out
    assert "Traceback" not in out
    assert out.endswith(f"{PROMPT}2\n{PROMPT}\n")  # the loop went on


def test_error_position_in_a_multi_line_entry(models):
    out = run('m = merge(load("rm"),\n  nope, 0.5)\n', models)
    assert "<repl:1>:2:3: error: unknown name 'nope'" in out
    assert "      nope, 0.5)\n      ^^^^\n" in out


def test_entries_are_named_in_order(tmp_path):
    out = run("1 +* 2\nfoo\n", tmp_path)
    assert "<repl:1>:1:4: error: unexpected '*'" in out
    assert "<repl:2>:1:1: error: unknown name 'foo'" in out


def test_incomplete_entry_ended_by_a_blank_line(tmp_path):
    out = run("a = merge(x,\n\n2 * 2\n", tmp_path)
    assert f"{PROMPT}{CONTINUE}<repl:1>:1:12: error: unexpected end of input" in out
    assert "    a = merge(x,\n               ^\n" in out
    assert "4\n" in out  # the next entry starts afresh


def test_pending_entry_is_checked_at_end_of_input(tmp_path):
    status, out, _ = session("y = (1 +\n", tmp_path)
    assert status == 0
    assert "<repl:1>:1:8: error: unexpected end of input; expected an expression" in out


def test_internal_error_shows_traceback_and_loop_goes_on(tmp_path, monkeypatch):
    out = io.StringIO()
    repl = Repl(Options(device="cpu"), input=io.StringIO("1\n2 + 2\n"), output=out, base_dir=tmp_path, interactive=True)
    real = repl.session.check
    calls = []

    def check(source):
        calls.append(source)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(source)

    monkeypatch.setattr(repl.session, "check", check)
    assert repl.loop() == 0
    text = out.getvalue()
    assert "internal error: RuntimeError: boom\n" in text
    assert "Traceback (most recent call last)" in text
    assert text.endswith(f"{PROMPT}4\n{PROMPT}\n")


def test_failed_entry_does_not_reserve_its_save_path(models, tmp_path):
    target = tmp_path / "again"
    out = run(f'm = load("base")\nsave(m, "{target}"); nope\nsave(m, "{target}")\n', models)
    assert "already the target" not in out
    assert (target / "config.json").is_file()


# ---- commands ----------------------------------------------------------------------------


def test_type_of_scalar_list_and_function(tmp_path):
    out = run(
        ":type 1 + 2\n:type [1, 2]\n:type [1, \"a\"]\n:type lerp\n:type merge\n"
        ":type lambda a, b: a\n:type true\n",
        tmp_path,
    )
    lines = [ln.removeprefix(PROMPT) for ln in out.splitlines()]
    assert lines[:7] == [
        "Scalar",
        "List[Scalar]",
        "List[Scalar | String]",
        "Function lerp(a: Checkpoint, b: Checkpoint, t: Param)",
        "Function merge(rm: Checkpoint, lm: Checkpoint, lam: Param, tokenizer: String | Checkpoint | None = none)",
        "Function lambda a, b",
        "Bool",
    ]


def test_type_of_a_user_function_shows_defaults(tmp_path):
    out = run("def f(m: Checkpoint, t: Scalar = 0.5) = m\n:type f\n", tmp_path)
    assert "Function f(m: Checkpoint, t: Scalar = 0.5)\n" in out


def test_type_of_checkpoints(models):
    out = run(':type load("base")\n:type [load("base"), load("math")]\n:type load("rm")\n', models)
    assert "Checkpoint(LlamaForCausalLM, 21 tensors, " in out
    assert "List[Checkpoint]\n" in out
    assert "Checkpoint(LlamaForSequenceClassification, " in out


def test_type_continues_over_lines_and_reports_errors(tmp_path):
    out = run(":type [1,\n 2]\n:type nope\n:type a = 1\n:type\n", tmp_path)
    assert f"{CONTINUE}List[Scalar]\n" in out
    assert "<repl:2>:1:1: error: unknown name 'nope'" in out
    assert "<repl:3>:1:1: error: expected a single expression" in out
    assert "usage: :type EXPR" in out


def test_plan_of_a_checkpoint_expression(models):
    out = run(':plan lerp(load("base"), load("math"), 0.3)\n', models)
    assert "materialise 21 tensors" in out
    assert "predicted peak working memory: " in out


def test_plan_of_a_save_runs_nothing(models, tmp_path):
    target = tmp_path / "planned"
    out = run(f'm = lerp(load("base"), load("math"), 0.3)\n:plan save(m, "{target}")\n', models)
    assert f"save {target}" in out
    assert "predicted peak working memory of the run: " in out
    assert not target.exists()


def test_plan_needs_a_checkpoint(tmp_path):
    out = run(":plan 1 + 1\n:plan x = load(\"base\")\n", tmp_path)
    assert "<repl:1>:1:1: error: :plan needs a checkpoint or a save(...), not Scalar" in out
    assert "<repl:2>:1:1: error: :plan takes an expression, not a statement" in out


def test_help_lists_builtins_prelude_and_commands(tmp_path):
    out = run(":help\n", tmp_path)
    assert "  merge(rm: Checkpoint, lm: Checkpoint, lam: Param, tokenizer: String | Checkpoint | None = none)\n" in out
    assert "  load(path: String)\n      A lazy checkpoint: a Hugging Face folder or a .safetensors file.\n" in out
    assert "  lerp(a: Checkpoint, b: Checkpoint, t: Param)\n" in out
    assert "  ema(ms: List[Checkpoint], mu: Param)\n" in out
    for cmd in (":type EXPR", ":plan EXPR", ":help [NAME]", ":load FILE", ":quit"):
        assert cmd in out


def test_help_for_one_name(tmp_path):
    out = run(":help lerp\n:help merge\n:help lerrp\nt = 3\n:help t\n", tmp_path)
    assert "lerp(a: Checkpoint, b: Checkpoint, t: Param)  (defined at stdlib/prelude.alg:" in out
    assert "    Linear interpolation: (1 - t) * a + t * b." in out
    assert "merge(rm: Checkpoint, lm: Checkpoint, lam: Param, tokenizer: String | Checkpoint | None = none)  (builtin)\n    DogeRM:" in out
    assert "error: no name 'lerrp'; did you mean 'lerp'?" in out
    assert "t: Scalar = 3\n" in out


def test_unknown_command_lists_commands(tmp_path):
    out = run(":frobnicate\n", tmp_path)
    assert "error: unknown command ':frobnicate'; the commands are:" in out
    assert ":plan EXPR" in out


def test_load_runs_a_file_in_the_session(tmp_path):
    (tmp_path / "defs.alg").write_text("def sq(x: Scalar) = x * x\nseven = 7\n")
    out = run(":load defs.alg\nsq(seven)\n:load missing.alg\n", tmp_path)
    assert "49\n" in out
    assert "no such recipe file: 'missing.alg'" in out


# ---- leaving ------------------------------------------------------------------------------


def test_quit_stops_reading(tmp_path):
    status, out, _ = session("1 + 1\n:quit\n40 + 2\n", tmp_path)
    assert status == 0
    assert "2\n" in out and "42" not in out
    status, out, _ = session(":q\n40 + 2\n", tmp_path)
    assert status == 0 and "42" not in out


def test_end_of_input_exits_zero(tmp_path):
    status, out, repl = session("", tmp_path)
    assert status == 0
    assert out == f"{PROMPT}\n"
    assert repl._readline is None  # an explicit stream never touches readline


class Keys(io.StringIO):
    """An input stream on which the line "^C" is a KeyboardInterrupt."""

    def readline(self, *args):
        line = super().readline(*args)
        if line == "^C\n":
            raise KeyboardInterrupt
        return line


def test_ctrl_c_cancels_an_entry(tmp_path):
    out = io.StringIO()
    repl = Repl(Options(device="cpu"), input=Keys("x = [1,\n^C\n5 * 5\n"), output=out,
                base_dir=tmp_path, interactive=True)
    assert repl.loop() == 0
    text = out.getvalue()
    assert "(entry cancelled)" in text
    assert "25\n" in text
    assert "error" not in text


def test_second_ctrl_c_at_empty_prompt_exits(tmp_path):
    out = io.StringIO()
    repl = Repl(Options(device="cpu"), input=Keys("^C\n1\n^C\n^C\n2 + 40\n"), output=out,
                base_dir=tmp_path, interactive=True)
    assert repl.loop() == 0
    text = out.getvalue()
    assert "1\n" in text  # one Ctrl-C, then an entry: not yet leaving
    assert "42" not in text


def test_history_path(monkeypatch, tmp_path):
    monkeypatch.setenv("ALG_HISTORY", str(tmp_path / "h"))
    assert history_path() == str(tmp_path / "h")
    monkeypatch.delenv("ALG_HISTORY")
    assert history_path() == str(Path.home() / ".alg_history")


def alg_repl(text: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "algebra", "repl", "--device", "cpu"], input=text,
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_piped_repl_is_a_script(tmp_path):
    """Piped input: no prompts, values on stdout, errors on stderr, status 1 if any
    entry failed; the entries after a failure still run."""
    proc = alg_repl("print(1 + 1)\nnope\nx = [1,\n  2]\nlen(x)\n:quit\n", tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == "2\n2\n"
    assert PROMPT not in proc.stdout + proc.stderr and CONTINUE not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("<repl:2>:1:1: error: unknown name 'nope'")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_piped_repl_without_errors_exits_zero(tmp_path, monkeypatch):
    """`alg repl` on a pipe's text, in this process (the subprocess above runs one)."""
    from conftest import alg_main

    monkeypatch.setattr(sys, "stdin", io.StringIO("def f(t) = t * 3\nf(5)\n:type f\n"))
    proc = alg_main("repl", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "15\nFunction f(t)\n"
    assert proc.stderr == ""


@pytest.mark.parametrize("text", [
    ":frobnicate\n",  # an unknown command
    ":type\n",  # a command without its argument
    ":load missing.alg\n",
    "y = (1 +\n",  # an entry still open at end of input
])
def test_piped_repl_counts_every_kind_of_failure(tmp_path, text):
    status, out, err = piped(text, tmp_path)
    assert status == 1, (out, err)
    assert err and out == ""


def piped(text: str, base_dir: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    repl = Repl(Options(device="cpu"), input=io.StringIO(text), output=out, base_dir=base_dir, errors=err)
    assert repl.interactive is False  # a StringIO is no terminal
    return repl.loop(), out.getvalue(), err.getvalue()


def test_piped_warnings_go_to_the_error_stream(tmp_path):
    status, out, err = piped("1 + 1\n", tmp_path)
    assert (status, out, err) == (0, "2\n", "")
    repl = Repl(Options(device="cpu"), input=io.StringIO(""), output=io.StringIO(), base_dir=tmp_path,
                errors=(err := io.StringIO()))
    repl.options.warn(Diagnostic("careful"))
    assert err.getvalue() == "alg: warning: careful\n" and repl.failed == 0


def test_ctrl_c_stops_a_script(tmp_path):
    out = io.StringIO()
    repl = Repl(Options(device="cpu"), input=Keys("1\n^C\n2\n"), output=out, base_dir=tmp_path,
                errors=io.StringIO())
    assert repl.loop() == 130
    assert out.getvalue() == "1\n"


def test_internal_error_in_a_script_fails_it(tmp_path, monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    repl = Repl(Options(device="cpu"), input=io.StringIO("1\n2 + 2\n"), output=out, base_dir=tmp_path,
                errors=err)
    monkeypatch.setattr(repl.session, "check", lambda source: 1 / 0)
    assert repl.loop() == 1
    assert "internal error: ZeroDivisionError" in err.getvalue() and out.getvalue() == ""


def test_terminal_session_exits_zero_after_errors(tmp_path):
    status, out, _ = session("nope\n1 + 1\n", tmp_path)
    assert status == 0
    assert f"{PROMPT}<repl:1>:1:1: error: unknown name 'nope'" in out and out.endswith(f"{PROMPT}2\n{PROMPT}\n")


def test_help_shows_each_whole_first_sentence(tmp_path):
    """`:help` gives each function's first sentence whole: "et al." or "e.g." end none."""
    from algebra.registry import REGISTRY

    out = run(":help\n", tmp_path)
    assert "Model Stock (Jang et al. 2024), per tensor: " in out
    assert "floats allowed, e.g. range(0, 1.01, 0.1).\n" in out
    lines = out.splitlines()
    for b in REGISTRY.builtins.values():
        flat = " ".join(b.doc.split())
        got = lines[lines.index(f"  {b.signature()}") + 1].strip()
        assert flat.startswith(got) and got.endswith("."), b.name
        assert got == flat or flat[len(got)] == " ", b.name  # ends where a sentence does
        assert not got.endswith((" al.", "e.g.", "i.e.")), b.name


def test_terminal_repl_keeps_prompts_and_status_zero(tmp_path):
    """On a pseudo-terminal: prompts (through readline), errors inline, status 0."""
    import pty
    import select

    master, slave = pty.openpty()
    env = dict(os.environ, HF_HUB_OFFLINE="1", ALG_HISTORY=str(tmp_path / "history"), TERM="dumb")
    proc = subprocess.Popen([sys.executable, "-m", "algebra", "repl", "--device", "cpu"], stdin=slave,
                            stdout=slave, stderr=slave, cwd=tmp_path, env=env, close_fds=True)
    os.close(slave)
    os.write(master, b"nope\n40 + 2\n:quit\n")
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    text = seen.decode().replace("\r\n", "\n")
    assert text.count(PROMPT) >= 3
    assert "<repl:1>:1:1: error: unknown name 'nope'" in text and "\n42\n" in text
