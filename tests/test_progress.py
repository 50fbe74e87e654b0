"""Progress bars (algebra/progress.py): drawn on a terminal, silent when piped or with
--quiet, forced by --progress; a save shows tensors and bytes with rate and ETA, a
multi-step plan its step, scoring and sampling the texts done. The CLI is run under a
pseudo-terminal (`pty`), as a user's shell runs it."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
from conftest import alg_main, read_folder
from tqdm import tqdm

from algebra import Interpreter, Options
from algebra.progress import NULL_BAR, Progress

ALG = [sys.executable, "-m", "algebra"]
RECIPE = ('a = load("models/base")\nb = load("models/math")\n'
          'save(slerp(a, b, 0.5), "out/s")\n')  # slerp: reduce steps (angles), then writes


@pytest.fixture(scope="module")
def ws(tmp_path_factory, family) -> Path:
    root = tmp_path_factory.mktemp("progress")
    (root / "models").mkdir()
    for name in ("base", "math"):
        (root / "models" / name).symlink_to(family[name])
    (root / "r.alg").write_text(RECIPE)
    return root


def _clean(ws: Path) -> None:
    import shutil

    shutil.rmtree(ws / "out", ignore_errors=True)


def run_on_pty(args: list[str], cwd: Path, size: tuple[int, int] = (30, 120)) -> tuple[int, str]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal of `size` (rows,
    columns); return its exit status and everything it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    proc = subprocess.Popen([*ALG, *args], cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode("utf-8", "replace")


def piped(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The CLI with stdout and stderr that are no terminal (in this process: the
    subprocess runs above are the ones on a terminal)."""
    return alg_main(*args, cwd=cwd)


def _expected(ws: Path) -> tuple[int, str]:
    """The saved checkpoint's tensor count and byte size as the bar must end: bytes
    summed from the files' own tensors, formatted as tqdm formats 1024-based sizes."""
    tensors = read_folder(ws / "out" / "s")
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    size = tqdm.format_sizeof(nbytes, divisor=1024) + "B"
    return len(tensors), f"{size}/{size}"


def _frames(text: str) -> list[str]:
    """The states a terminal showed, one per carriage return or newline."""
    return [f.strip() for f in re.split(r"[\r\n]+", text) if f.strip()]


def test_save_on_a_terminal_shows_tensors_bytes_rate_eta_and_steps(ws):
    _clean(ws)
    rc, out = run_on_pty(["run", "r.alg", "--device", "cpu"], ws)
    assert rc == 0, out
    n, size = _expected(ws)
    bars = [f for f in _frames(out) if f.startswith("save s:")]
    assert bars, out
    first, last = bars[0], bars[-1]
    assert " 0%" in first and f"0/{n} tensors" in first
    assert "100%" in last and size in last and f"{n}/{n} tensors" in last, last
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+[kMG]?B/s", last), last  # elapsed<ETA, rate
    steps = [int(m.group(1)) for f in bars for m in [re.search(r"step (\d+)/(\d+)", f)] if m]
    assert steps and steps == sorted(steps)  # the plan's steps, in order
    assert any(re.search(r"step \d+/\d+ reduce", f) for f in bars)  # slerp's angles
    assert out.index("100%") < out.index("wrote out/s")  # the bar ends before the report


def test_silent_when_piped_and_forced_by_progress(ws):
    _clean(ws)
    r = piped(["run", "r.alg", "--device", "cpu"], ws)
    assert r.returncode == 0 and "wrote out/s" in r.stdout, r.stderr
    assert r.stderr == ""
    _clean(ws)
    r = piped(["run", "r.alg", "--device", "cpu", "--progress"], ws)
    assert r.returncode == 0, r.stderr
    n, size = _expected(ws)
    last = _frames(r.stderr)[-1]
    assert "save s: 100%" in last and size in last and f"{n}/{n} tensors" in last, r.stderr
    assert "%|" not in r.stdout  # progress goes to stderr only


def test_quiet_is_silent_on_a_terminal(ws):
    _clean(ws)
    rc, out = run_on_pty(["run", "r.alg", "--device", "cpu", "--quiet"], ws)
    assert rc == 0, out
    assert "wrote out/s" in out
    assert "%|" not in out and "tensors," not in out.split("wrote")[0]


def test_progress_and_quiet_exclude_each_other(ws):
    r = piped(["run", "r.alg", "--progress", "--quiet"], ws)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


# ---- in process ------------------------------------------------------------------------


def test_modes_and_their_spellings():
    assert Options().progress == Progress("off")  # the API's default
    assert Options(progress=True).progress.mode == "on"
    assert Options(progress=False).progress.mode == "off"
    assert Options(progress="auto").progress.mode == "auto"
    with pytest.raises(ValueError, match="progress must be"):
        Options(progress="loud")
    with pytest.raises(ValueError, match="progress must be"):
        Options(progress=1)
    assert Progress("off").bar(10, "x") is NULL_BAR
    assert Progress("auto", io.StringIO()).bar(10, "x") is NULL_BAR  # not a terminal
    import pickle

    p = pickle.loads(pickle.dumps(Progress("on", io.StringIO())))
    assert p.mode == "on" and p.stream is None  # the receiver's own stderr


def _pty_stream(rows: int, cols: int):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return master, os.fdopen(slave, "w", encoding="utf-8")


def _drain(fd: int) -> str:
    import select

    data = b""
    while select.select([fd], [], [], 0.5)[0]:
        data += os.read(fd, 65536)
    return data.decode()


@pytest.mark.parametrize("size", [(24, 100), (0, 0)])  # a terminal that reports 0x0 too
def test_auto_draws_on_a_terminal(size):
    master, stream = _pty_stream(*size)
    try:
        prog = Progress("auto", stream)
        assert prog.enabled()
        with prog.bar(3000, "work", unit="B", items=2, item_unit="tensors") as bar:
            bar.update(1000)
            bar.item_done()
            bar.update(2000)
            bar.item_done()
        stream.flush()
        text = _drain(master)
    finally:
        stream.close()
        os.close(master)
    last = _frames(text)[-1]
    assert last.startswith("work: 100%") and "2.93kB/2.93kB" in last and "2/2 tensors" in last, text


def test_a_failed_bar_is_erased():
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress("on", out).bar(10, "doomed") as bar:
        bar.update(4)
        raise RuntimeError("boom")
    assert "doomed:   0%" in out.getvalue()  # it was drawn
    assert out.getvalue().rstrip("\r").rsplit("\r", 1)[-1].strip() == ""  # the line is blanked


def test_interpreter_option(capsys):
    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    Interpreter(device="cpu").eval("lerp(a, b, 0.5)", a=sd, b=sd).state_dict()
    assert capsys.readouterr().err == ""  # off by default
    got = Interpreter(device="cpu", progress=True).eval("lerp(a, b, 0.5)", a=sd, b=sd).state_dict()
    torch.testing.assert_close(got["w"], sd["w"])
    last = _frames(capsys.readouterr().err)[-1]
    assert "100%" in last and "40.0B/40.0B" in last and "2/2 tensors" in last  # 10 float32 elements


def test_sampling_and_scoring_show_texts(ws_rewards, monkeypatch):
    from algebra.interpreter import Session
    from algebra.reward import engine
    from algebra.source import Source

    monkeypatch.setenv("ALG_CACHE", str(ws_rewards / "cache-progress"))
    err = io.StringIO()
    session = Session(Options(device="cpu", out=lambda _: None, progress=Progress("on", err)), ws_rewards)
    checked = session.check(Source(
        'g = generate(load("models/policy"), ["What is 12 plus 30?", "Name a colour."], n=3, '
        'max_new_tokens=3, seed=1)\nscore(reward("models/rm-helpful"), g, "out/p.jsonl")\n', "t.alg"))
    run = engine.run_sinks(checked.sinks, session.options)
    frames = _frames(err.getvalue())
    sampled = [f for f in frames if f.startswith("sample ")]
    scored = [f for f in frames if f.startswith("score ")]
    assert sampled and "100%" in sampled[-1] and "6/6" in sampled[-1], frames  # 2 prompts x 3
    assert run.scored > 0 and scored and "100%" in scored[-1], frames
    assert f"{run.scored}/{run.scored}" in scored[-1] and "text/s" in scored[-1]


@pytest.fixture
def ws_rewards(tmp_path, rms) -> Path:
    (tmp_path / "models").mkdir()
    for name, path in rms.items():
        (tmp_path / "models" / name).symlink_to(path)
    return tmp_path
