"""Faults and hostile paths (issue 9): what alg promises, held to it.

- A path written by a recipe is never also read by it (checked with both positions).
- overwrite=true / --force replaces only a model folder, or a symlink itself; every other
  target is refused with the reason, at check time and again right before replacing.
- SIGINT, SIGTERM and SIGHUP mid-save leave nothing behind; the temp folder a SIGKILLed
  run leaves is removed by the next save beside it (a live process's is kept).
- A full disk or a read-only folder is a clear error with nothing left behind, parent
  folders the save made included; `alg check` warns when the target lacks the space and
  refuses a folder it cannot write.

Real tmpfs mounts are used where this machine allows them (root); otherwise those tests
skip with the reason, and the monkeypatched ones still hold the error paths.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import alg_main, quiet_interpreter

from algebra.errors import AlgError


def alg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`alg ARGS` in this process (tests/conftest.py `alg_main`): the same output and exit
    status without a start-up; the signal tests below run real subprocesses."""
    return alg_main(*args, cwd=cwd)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".alg-tmp-" in p.name or ".alg-old-" in p.name)


@pytest.fixture
def tiny(family, tmp_path) -> Path:
    """tmp_path/tiny/{base,sft_a}: private copies (a failed refusal must not harm the
    session's family)."""
    _copy(family["base"], tmp_path / "tiny" / "base")
    _copy(family["math"], tmp_path / "tiny" / "sft_a")
    return tmp_path / "tiny"


# ---- 1. a path written is not also read ----------------------------------------------------


def test_seq3_recipe_is_refused_at_check_with_both_positions(tiny, tmp_path):
    """The issue's recipe: `c` is read, then overwritten, then `c + 0` saved. Before the
    fix `d` matched neither the old nor the new `c` (exit 0)."""
    (tmp_path / "mk.alg").write_text('save(load("tiny/base"), "c")\n')
    (tmp_path / "seq3.alg").write_text(
        'a = load("tiny/sft_a"); c = load("c")\n'
        'save(stack(layers(a, 0, 2), layers(a, 0, 2)), "c", overwrite=true)\n'
        'save(c + 0, "d")\n'
    )
    assert alg("run", "mk.alg", cwd=tmp_path).returncode == 0
    before = (tmp_path / "c" / "model-00001-of-00001.safetensors").read_bytes()
    for cmd in ("check", "run"):
        r = alg(cmd, "seq3.alg", cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert "seq3.alg:2:47: error: save to 'c' would replace" in r.stderr
        assert "which this recipe reads" in r.stderr
        assert "seq3.alg:1:34: note: loaded here" in r.stderr
    assert not (tmp_path / "d").exists()
    assert (tmp_path / "c" / "model-00001-of-00001.safetensors").read_bytes() == before
    assert _temps(tmp_path) == []


def test_read_after_write_is_refused_at_the_read(tiny, tmp_path):
    interp = quiet_interpreter(tmp_path)
    with pytest.raises(AlgError) as e:
        interp.eval('save(load("tiny/base") * 2, "out/m")\nx = load("out/m")\nsave(x, "y")')
    err = e.value
    assert "'out/m' is written earlier in this recipe" in err.message
    assert err.span.line == 2
    assert [(n.message, n.span.line) for n in err.notes] == [("written here", 1)]
    assert not (tmp_path / "out").exists() and not (tmp_path / "y").exists()


def test_reading_a_file_inside_a_written_folder_is_refused(tiny, tmp_path):
    interp = quiet_interpreter(tmp_path)
    with pytest.raises(AlgError, match="'out/rows.jsonl' is inside '.*out', which this recipe writes"):
        interp.eval('save(load("tiny/base"), "out")\nr = responses("out/rows.jsonl")')


def test_read_through_a_symlink_compares_the_real_path(tiny, tmp_path):
    (tmp_path / "c").symlink_to(tmp_path / "tiny" / "sft_a")
    interp = quiet_interpreter(tmp_path)
    with pytest.raises(AlgError, match="save to 'tiny/sft_a' would replace") as e:
        interp.eval('x = load("c")\nsave(load("tiny/base"), "tiny/sft_a", overwrite=true)')
    assert e.value.notes[0].message == "loaded here" and e.value.notes[0].span.line == 1


def test_writing_a_folder_that_holds_an_input_is_refused(tiny, tmp_path):
    _copy(tmp_path / "tiny" / "sft_a", tmp_path / "other")
    interp = quiet_interpreter(tmp_path)
    with pytest.raises(AlgError, match="would replace a folder holding '.*tiny/base', which this recipe reads"):
        interp.eval('a = load("tiny/base")\nsave(load("other"), "tiny", overwrite=true)')
    assert (tmp_path / "tiny" / "base" / "config.json").is_file()


def test_score_output_read_later_is_refused(ws):
    (ws / "r.alg").write_text(
        'r = reward("models/rm-helpful")\n'
        'score(r, "data/prompts_responses.jsonl", "scored.jsonl")\n'
        'again = responses("scored.jsonl")\n'
    )
    r = alg("check", "r.alg", cwd=ws)
    assert r.returncode == 1
    assert "r.alg:3:19: error: 'scored.jsonl' is written earlier in this recipe (score())" in r.stderr
    assert "r.alg:2:42: note: written here" in r.stderr


# ---- 2. what overwrite may replace ---------------------------------------------------------


def _refused(base: Path, text: str, match: str, **kw) -> AlgError:
    with pytest.raises(AlgError, match=match) as e:
        quiet_interpreter(base, **kw).eval(text)
    return e.value


def test_overwrite_refuses_the_current_folder(tiny, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    (tmp_path / "r").mkdir()
    _refused(tmp_path / "r", f'save(load("{tiny}/base"), "{here}", overwrite=true)',
             "refusing to replace .*: it is the current folder")
    assert (here / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_the_recipe_folder_and_its_ancestors(tiny, tmp_path):
    base = tmp_path / "a" / "r"
    base.mkdir(parents=True)
    (base / "recipe.alg").write_text("x = 1\n")
    for path in (".", ".."):
        _refused(base, f'save(load("{tiny}/base"), "{path}", overwrite=true)',
                 f"refusing to replace '{re_escape(path)}': it holds the recipe")
    assert (base / "recipe.alg").is_file()


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_overwrite_refuses_home_and_folders_in_it(tiny, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    base = tmp_path / "r"
    base.mkdir()
    _refused(base, f'save(load("{tiny}/base"), "~", overwrite=true)',
             "refusing to replace '~': it is your home folder")
    _refused(base, f'save(load("{tiny}/base"), "~/.ssh", overwrite=true)',
             "refusing to replace '~/.ssh': it holds 'id_rsa', which is not a model file")
    _refused(base, f'save(load("{tiny}/base"), "~/.ssh")', "it holds 'id_rsa'", force=True)  # --force
    assert (home / ".ssh" / "id_rsa").read_text() == "secret"


def test_overwrite_refuses_a_shard_of_an_input(tiny, tmp_path):
    shard = tmp_path / "tiny" / "base" / "model.safetensors"
    before = shard.read_bytes()
    # the input of the save itself
    _refused(tmp_path, 'save(lerp(load("tiny/base"), load("tiny/sft_a"), .5), "tiny/base/model.safetensors", '
             'overwrite=true)', "would write inside its own input")
    # an input of another statement
    _refused(tmp_path, 'a = load("tiny/base")\nsave(load("tiny/sft_a"), "tiny/base/model.safetensors", '
             'overwrite=true)', "would write inside '.*tiny/base', which this recipe reads")
    assert shard.is_file() and shard.read_bytes() == before


def test_overwrite_refuses_a_file(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _refused(tmp_path, 'save(load("tiny/base"), "notes.txt", overwrite=true)',
             "refusing to replace 'notes.txt': it is a file, not a model folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_with_a_subfolder(tiny, tmp_path):
    out = _copy(tmp_path / "tiny" / "base", tmp_path / "out")
    (out / "runs").mkdir()
    _refused(tmp_path, 'save(load("tiny/base"), "out", overwrite=true)',
             "it holds 'runs', which is not a model file")
    assert (out / "runs").is_dir()


def test_overwrite_refuses_a_target_reached_through_a_symlink(tiny, tmp_path):
    real = tmp_path / "real"
    _copy(tmp_path / "tiny" / "base", real / "out")
    (tmp_path / "link").symlink_to(real)
    _refused(tmp_path, 'save(load("tiny/sft_a"), "link/out", overwrite=true)',
             "refusing to replace 'link/out': it is reached through the symlink '.*link'")
    assert (real / "out" / "config.json").is_file()


def test_a_symlink_target_is_replaced_itself_never_what_it_points_to(tiny, tmp_path, read):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    (tmp_path / "lnk").symlink_to(keep)
    quiet_interpreter(tmp_path).eval('save(load("tiny/base") * 2, "lnk", overwrite=true)')
    assert not (tmp_path / "lnk").is_symlink() and (tmp_path / "lnk" / "config.json").is_file()
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
    assert (keep / "notes.txt").read_text() == "mine"
    assert _temps(tmp_path) == []


def test_overwrite_replaces_a_model_folder_and_an_alg_output(tiny, tmp_path, read):
    import torch

    base = read(tmp_path / "tiny" / "base")
    _copy(tmp_path / "tiny" / "sft_a", tmp_path / "out")  # a transformers save: a model folder
    interp = quiet_interpreter(tmp_path)
    interp.eval('save(load("tiny/base") * 2, "out", overwrite=true)')
    assert torch.equal(read(tmp_path / "out")["model.norm.weight"], base["model.norm.weight"] * 2)
    # an earlier alg output, even with a file alg does not write, is alg's to replace
    (tmp_path / "out" / "eval.json").write_text("{}")
    quiet_interpreter(tmp_path, force=True).eval('save(load("tiny/base") * 3, "out")')
    assert torch.allclose(read(tmp_path / "out")["model.norm.weight"], base["model.norm.weight"] * 3)
    assert not (tmp_path / "out" / "eval.json").exists()


def test_force_on_the_command_line_is_refused_the_same(tiny, tmp_path):
    rdir = tmp_path / "r"
    rdir.mkdir()
    (rdir / "x.alg").write_text(f'save(load("{tiny}/base"), ".")\n')
    r = alg("run", "x.alg", "--force", cwd=rdir)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "x.alg:1:" in r.stderr and "refusing to replace '.': it is the current folder" in r.stderr
    assert (rdir / "x.alg").is_file()


def test_overwrite_is_judged_again_right_before_replacing(tiny, tmp_path, monkeypatch):
    """The target was a model folder at check time; a file of the user's lands in it while
    the save runs: nothing is replaced and nothing is left behind."""
    from algebra import execute

    _copy(tmp_path / "tiny" / "sft_a", tmp_path / "out")
    real = execute._write_metadata

    def meanwhile(sp, folder):
        (tmp_path / "out" / "notes.txt").write_text("mine")
        return real(sp, folder)

    monkeypatch.setattr(execute, "_write_metadata", meanwhile)
    _refused(tmp_path, 'save(load("tiny/base"), "out", overwrite=true)',
             "refusing to replace .*out': it holds 'notes.txt', which is not a model file")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert _temps(tmp_path) == []


# ---- 3. faults during a run ------------------------------------------------------------------

# Runs alg with a pause inside the first shard write (the temp folder exists, partly
# written), announced through the file $ALG_TEST_READY, so a signal lands mid-save.
PAUSED_ALG = """
import os, signal, sys, time
from pathlib import Path
# a shell starts background jobs with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: give the child the handler a terminal's alg run has
signal.signal(signal.SIGINT, signal.default_int_handler)
import algebra.io.safetensors as st
ready = Path(os.environ["ALG_TEST_READY"])
real = st.ShardWriter.write
def write(self, *a, **k):
    real(self, *a, **k)
    if not ready.exists():
        ready.write_text(str(os.getpid()))
        time.sleep(600)
st.ShardWriter.write = write
from algebra.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_paused(cwd: Path, recipe: str) -> tuple[subprocess.Popen, Path]:
    ready = cwd / "ready"
    env = {**os.environ, "ALG_TEST_READY": str(ready)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_ALG, "run", recipe], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"alg ended before the save began: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the save did not begin")
        time.sleep(0.05)
    return proc, ready


# SIGHUP takes SIGTERM's handler (cli._install_signal_handlers installs one for both): its
# case repeats SIGTERM's path in a subprocess of its own, so it runs in the slow tier
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)],
                         ids=lambda s: s.name)
def test_signal_mid_save_leaves_nothing(tiny, tmp_path, sig):
    (tmp_path / "x.alg").write_text('save(load("tiny/base") * 2, "out/m")\n')
    proc, _ = _start_paused(tmp_path, "x.alg")
    assert _temps(tmp_path / "out") == [f".m.alg-tmp-{proc.pid}"]  # mid-save indeed
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    assert "no partial output was left behind" in err and "Traceback" not in err
    if sig != signal.SIGINT:
        assert f"stopped by {sig.name}" in err
    assert not (tmp_path / "out").exists()  # temp folder and the parent it made


def test_signal_in_a_later_save_takes_back_the_earlier_ones(tiny, tmp_path):
    """A run is all or nothing: SIGTERM in the second save leaves neither output, and the
    output the first save was replacing (overwrite=true) is as it was."""
    (tmp_path / "x.alg").write_text('save(load("tiny/base"), "out/m1", overwrite=true)\n'
                                    'save(load("tiny/base") * 2, "out/m2")\n')
    _copy(tmp_path / "tiny" / "sft_a", tmp_path / "out" / "m1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "m1").iterdir()}
    ready = tmp_path / "ready"
    env = {**os.environ, "ALG_TEST_READY": str(ready)}
    script = PAUSED_ALG.replace("if not ready.exists():", "if 'm2' in str(self.path) and not ready.exists():")
    proc = subprocess.Popen([sys.executable, "-c", script, "run", "x.alg"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate(timeout=60) if proc.poll() is not None else proc.kill()
    assert _temps(tmp_path / "out") == [f".m1.alg-tmp-{proc.pid}", f".m2.alg-tmp-{proc.pid}"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m1"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "m1").iterdir()} == before


def test_sigkill_leftover_is_removed_by_the_next_save_beside_it(tiny, tmp_path):
    (tmp_path / "x.alg").write_text('save(load("tiny/base") * 2, "out/m")\n')
    proc, ready = _start_paused(tmp_path, "x.alg")
    proc.kill()
    proc.communicate(timeout=120)
    stale = f".m.alg-tmp-{proc.pid}"
    assert _temps(tmp_path / "out") == [stale]  # kill -9 cannot clean up
    live = tmp_path / "out" / f".other.alg-tmp-{os.getpid()}"  # a live process's: kept
    live.mkdir()
    ready.unlink()
    (tmp_path / "y.alg").write_text('save(load("tiny/base"), "out/n")\n')
    r = alg("run", "y.alg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _temps(tmp_path / "out") == [live.name]
    assert (tmp_path / "out" / "n" / "config.json").is_file()


def _mount_tmpfs(folder: Path, size: str) -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.fixture
def mounts():
    done: list[Path] = []
    yield done
    for m in reversed(done):
        subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=30)


def test_full_disk_real_tmpfs(tiny, tmp_path, mounts):
    fs = tmp_path / "fs"
    _mount_tmpfs(fs, "128k")  # the model is ~450 KiB
    mounts.append(fs)
    (tmp_path / "x.alg").write_text('save(load("tiny/base"), "fs/sub/dir/out")\n')
    r = alg("check", "x.alg", cwd=tmp_path)
    assert r.returncode == 0
    assert "warning: only" in r.stderr and "free where 'fs/sub/dir/out' is written" in r.stderr
    r = alg("run", "x.alg", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "x.alg:1:" in r.stderr and "no space left on the device" in r.stderr
    assert "nothing was left behind" in r.stderr
    assert list(fs.iterdir()) == []  # temp folder and the parents the save made


def test_read_only_folder_real_tmpfs(tiny, tmp_path, mounts):
    fs = tmp_path / "fs"
    _mount_tmpfs(fs, "4m")
    mounts.append(fs)
    (fs / "models").mkdir()
    r = subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {r.stderr.strip()}")
    (tmp_path / "x.alg").write_text('save(load("tiny/base"), "fs/models/out")\n')
    for cmd in ("check", "run"):
        r = alg(cmd, "x.alg", cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "x.alg:1:25: error: cannot save to 'fs/models/out':" in r.stderr
        assert "is on a read-only file system" in r.stderr
    assert [p.name for p in fs.iterdir()] == ["models"] and list((fs / "models").iterdir()) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EROFS, "is on a read-only file system"),
                                         (errno.EACCES, "no permission to write")])
def test_write_errors_at_run_time_are_user_errors(tiny, tmp_path, monkeypatch, code, words):
    """The disk fills (or turns read-only) after the check: a positioned AlgIOError, no
    temp folder, and the parent folders the save made are gone."""
    from algebra.io import safetensors

    real = safetensors.ShardWriter._pwrite
    calls = []

    def failing(self, data, offset):
        calls.append(offset)
        if len(calls) > 2:  # the header and a first chunk land, then the disk fails
            raise OSError(code, os.strerror(code))
        return real(self, data, offset)

    monkeypatch.setattr(safetensors.ShardWriter, "_pwrite", failing)
    err = _refused(tmp_path, 'save(load("tiny/base") * 2, "a/b/out")', words)
    assert "nothing was left behind" in err.message and err.span is not None
    assert not (tmp_path / "a").exists()


def test_check_refuses_a_path_under_a_file(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _refused(tmp_path, 'save(load("tiny/base"), "notes.txt/out")',
             "cannot save to 'notes.txt/out': '.*notes.txt' is a file, not a folder")


def test_stale_temps_rules(tmp_path):
    """Dead process: its temp folders and files go; an old output it had moved aside, with
    nothing in its place, is put back. A live process's temp folder stays."""
    from algebra.io.target import remove_stale_temps

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".m.alg-tmp-{dead.pid}").mkdir()
    (tmp_path / f".m.alg-old-{dead.pid}").mkdir()
    (tmp_path / f".m.alg-old-{dead.pid}" / "config.json").write_text("{}")
    (tmp_path / "n").mkdir()
    (tmp_path / f".n.alg-old-{dead.pid}").mkdir()
    (tmp_path / f".s.jsonl.alg-tmp-{dead.pid}").write_text("x")
    (tmp_path / f".k.alg-tmp-{os.getpid()}").mkdir()
    (tmp_path / ".notes.alg-tmp-x").mkdir()  # not a pid: not ours
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".k.alg-tmp-{os.getpid()}", ".notes.alg-tmp-x", "m", "n"]
    assert (tmp_path / "m" / "config.json").is_file()
