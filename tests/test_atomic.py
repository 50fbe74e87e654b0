"""A run is all or nothing (issue 11): every output of a recipe (saves, score and evaluate
files, plots) is staged under a temporary name and moved into place only when all sinks
have succeeded; on a failure none is left and an output overwritten is restored. An
existing score/evaluate output is refused without overwrite=true or --force."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import quiet_interpreter

from algebra.errors import AlgError, AlgRuntimeError
from algebra.io import target as tio


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".alg-tmp-" in p.name or ".alg-old-" in p.name)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Scores computed here stay here: other files' tests count what they score."""
    monkeypatch.setenv("ALG_CACHE", str(tmp_path / "alg-cache"))


@pytest.fixture
def rws(ws, family):
    """`ws` (models/, data/) with models/base and models/math for saves."""
    for name in ("base", "math"):
        (ws / "models" / name).symlink_to(family[name])
    return ws


RECIPE = ('save(load("models/base"), "out/a"{ow})\n'
          'save(lerp(load("models/base"), load("models/math"), 0.5), "out/b")\n'
          'score(reward("models/rm-helpful"), "data/prompts_responses.jsonl", "out/s.jsonl"{ow})\n')


def _fail_scores(monkeypatch):
    from algebra.reward import engine

    def boom(run, req, staging):
        raise AlgRuntimeError("the reward is nan at row 3")

    monkeypatch.setattr(engine, "_write_scores", boom)


def test_a_failing_last_sink_leaves_no_output(rws, monkeypatch):
    _fail_scores(monkeypatch)
    with pytest.raises(AlgError, match="nan at row 3") as e:
        quiet_interpreter(rws).eval(RECIPE.format(ow=""))
    assert "note: a run is all or nothing: the 2 output(s) written before this error were discarded" in str(e.value)
    assert not (rws / "out").exists()  # neither the saves nor the folder they made
    assert _leftovers(rws) == []


def test_a_failing_run_restores_an_output_it_overwrote(rws, monkeypatch):
    quiet_interpreter(rws).eval('save(load("models/math"), "out/a")')
    before = {p.name: p.read_bytes() for p in (rws / "out" / "a").iterdir()}
    (rws / "out" / "s.jsonl").write_text('{"old": 1}\n')
    _fail_scores(monkeypatch)
    with pytest.raises(AlgError, match="nan at row 3"):
        quiet_interpreter(rws).eval(RECIPE.format(ow=", overwrite=true"))
    assert {p.name: p.read_bytes() for p in (rws / "out" / "a").iterdir()} == before
    assert (rws / "out" / "s.jsonl").read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in (rws / "out").iterdir()) == ["a", "s.jsonl"]
    assert _leftovers(rws) == []


def test_a_successful_run_writes_every_output_and_reruns_with_overwrite(rws):
    import json

    from safetensors.torch import load_file

    quiet_interpreter(rws).eval(RECIPE.format(ow=""))
    assert (rws / "out" / "a" / "model-00001-of-00001.safetensors").is_file()
    assert (rws / "out" / "b" / "model-00001-of-00001.safetensors").is_file()
    rows = [json.loads(line) for line in (rws / "out" / "s.jsonl").read_text().splitlines()]
    assert rows and all("reward" in r for r in rows)
    first = load_file(rws / "out" / "a" / "model-00001-of-00001.safetensors")
    # out/b is not overwritable here: --force (Options.force) re-runs the whole recipe
    quiet_interpreter(rws, force=True).eval(RECIPE.format(ow=""))
    again = load_file(rws / "out" / "a" / "model-00001-of-00001.safetensors")
    assert first.keys() == again.keys() and all((first[k] == again[k]).all() for k in first)
    assert _leftovers(rws) == []


@pytest.mark.parametrize("text, param", [
    ('score(reward("models/rm-helpful"), "data/prompts_responses.jsonl", "o.jsonl")', "o.jsonl"),
    ('evaluate(reward("models/rm-helpful"), "data/prefs.jsonl", "o.json")', "o.json"),
    ('evaluate([reward("models/rm-helpful")], "data/prefs.jsonl", "e.json", plot="o.png")', "o.png"),
])
def test_score_and_evaluate_refuse_an_existing_output(ws, text, param):
    (ws / param).write_text("mine")
    with pytest.raises(AlgError, match=f"'{param}' already exists; pass overwrite=true to"):
        quiet_interpreter(ws).session.check(_src(text))
    assert (ws / param).read_text() == "mine"
    quiet_interpreter(ws).session.check(_src(text[:-1] + ", overwrite=true)"))  # no error
    quiet_interpreter(ws, force=True).session.check(_src(text))  # --force


def _src(text: str):
    from algebra.source import Source

    return Source(text, "<test>")


def test_score_with_overwrite_replaces_the_file(ws):
    (ws / "o.jsonl").write_text("mine\n")
    quiet_interpreter(ws).eval(
        'score(reward("models/rm-helpful"), "data/prompts_responses.jsonl", "o.jsonl", overwrite=true)')
    n = len((ws / "data" / "prompts_responses.jsonl").read_text().splitlines())
    assert len((ws / "o.jsonl").read_text().splitlines()) == n
    assert _leftovers(ws) == []


# ---- Staging itself ---------------------------------------------------------------------------


def test_a_commit_failing_half_way_puts_back_what_it_replaced(tmp_path):
    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("old m")
    st = tio.Staging()
    ta, tm = tio.temp_name(tmp_path / "a.json"), tio.temp_name(tmp_path / "m")
    ta.write_text("new a")
    tm.mkdir()
    (tm / "config.json").write_text("new m")
    st.add(ta, tmp_path / "a.json")
    st.add(tm, tmp_path / "m")
    st.add(tio.temp_name(tmp_path / "c.json"), tmp_path / "c.json")  # its temporary is gone: rename fails
    with pytest.raises(AlgError, match="c.json.*no output of this run was moved into place"):
        st.commit()
    assert (tmp_path / "a.json").read_text() == "old a"
    assert (tmp_path / "m" / "config.json").read_text() == "old m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "m"]


def test_a_refused_check_at_commit_moves_nothing(tmp_path):
    st = tio.Staging()
    t1, t2 = tio.temp_name(tmp_path / "x.json"), tio.temp_name(tmp_path / "y.json")
    t1.write_text("x")
    t2.write_text("y")

    def refuse(final):
        raise AlgError("refused")

    st.add(t1, tmp_path / "x.json")
    st.add(t2, tmp_path / "y.json", refuse)
    with pytest.raises(AlgError, match="refused"):
        st.commit()
    assert list(tmp_path.iterdir()) == []


def test_a_stale_temp_file_of_a_dead_process_is_removed(ws):
    dead = 2 ** 22 + 12345  # above the default pid_max
    assert not tio.pid_alive(dead)
    (ws / "out").mkdir()
    stale = ws / "out" / f".s.jsonl.alg-tmp-{dead}"
    stale.write_text("half")
    quiet_interpreter(ws).eval('score(reward("models/rm-helpful"), "data/prompts_responses.jsonl", "out/s.jsonl")')
    assert not os.path.lexists(stale)
    assert (ws / "out" / "s.jsonl").is_file()


def test_a_python_api_run_with_a_failing_save_leaves_nothing(family, tmp_path, monkeypatch):
    """Interpreter.eval with several sinks: the second save's failure takes the first away."""
    from algebra import execute

    real = execute.run_tensor_plan
    calls = []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a signal mid-run
        return real(*a, **k)

    monkeypatch.setattr(execute, "run_tensor_plan", second_fails)
    shutil.copytree(family["base"], tmp_path / "base")
    with pytest.raises(KeyboardInterrupt):
        quiet_interpreter(tmp_path).eval('save(load("base"), "o1")\nsave(load("base"), "o2", dtype="bf16")')
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "alg-cache") == ["base"]


def test_the_command_line_refuses_an_existing_score_output_without_force(ws):
    from conftest import alg_main  # in this process: the same output and status, no start-up

    (ws / "r.alg").write_text('score(reward("models/rm-helpful"), "data/prompts_responses.jsonl", "o.jsonl")\n')
    (ws / "o.jsonl").write_text("mine\n")
    r = alg_main("check", "r.alg", cwd=ws)
    assert r.returncode == 1
    assert ("r.alg:1:68: error: 'o.jsonl' already exists; pass overwrite=true to score(), or --force to alg run"
            in r.stderr)
    assert "Traceback" not in r.stderr
    r = alg_main("check", "--force", "r.alg", cwd=ws)
    assert r.returncode == 0, r.stderr


def test_a_pickled_reward_function_replays_an_eval_whose_output_now_exists(ws):
    """A TRL reward function is rebuilt by checking the evals again; the score file the
    first eval wrote exists now, and that is no error there (nothing runs)."""
    import pickle

    interp = quiet_interpreter(ws)
    interp.eval('score(reward("models/rm-helpful"), "data/prompts_responses.jsonl", "o.jsonl")')
    r = interp.eval('r = reward("models/rm-helpful")')
    prompts, completions = ["What is 12 plus 30?"], ["42."]
    assert pickle.loads(pickle.dumps(r))(prompts=prompts, completions=completions) == \
        r(prompts=prompts, completions=completions)


@pytest.mark.parametrize("text, how", [
    ('s = "data/prompts_responses.jsonl"\nscore(reward("models/rm-helpful"), s, "o.jsonl")\n'
     'score(reward("models/rm-harmless"), s, "o.jsonl")', "the same path as"),
    ('save(load("models/base"), "out")\nscore(reward("models/rm-helpful"), "data/prompts_responses.jsonl", '
     '"out/s.jsonl")', "inside the folder of"),
])
def test_two_outputs_of_one_recipe_may_not_overlap(rws, text, how):
    with pytest.raises(AlgError, match=f"would write {how} another output of this recipe") as e:
        quiet_interpreter(rws).session.check(_src(text))
    assert e.value.span.line == text.count("\n") + 1  # the second output is the one refused
    assert any("writes it here" in n.message for n in e.value.notes)
    assert not (rws / "o.jsonl").exists() and not (rws / "out").exists()
