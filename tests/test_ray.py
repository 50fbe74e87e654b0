"""Scoring and generation on Ray (`alg run --ray`, algebra/distributed.py).

The option's usage errors, and what travels to an actor (a checked model pickled and
rebuilt), run in the default tier: they start no Ray. The rest runs on a local Ray
cluster of 2 CPUs that this module starts once (several seconds, minutes under load),
so it is in the `slow` tier (`pytest -m slow tests/test_ray.py`): scores equal to a
local run's in the same row order and shared with it through the on-disk cache, a
worker killed mid-run (retried: the output is complete and right), and a worker that
keeps dying (the run fails and leaves no output); and the same for `generate`: texts
(greedy and sampled) equal to a local run's in the same order, from the local run's
batches, and the same generation cache files; and for `kl`/`front`: the same samples and
log-ratios as a local run, with a killed worker too, or no output when it stays dead.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from algebra import AlgError, Interpreter, Options
from algebra.cli import main
from algebra.errors import AlgRuntimeError, AlgUsageError
from algebra.interpreter import Session
from algebra.source import Source

ROOT = Path(__file__).resolve().parent.parent

# 12 texts in batches of 2 and 3: more batches than workers, so both workers score
RECIPE = ('h = reward("models/rm-helpful", batch_size=2)\n'
          'm = reward(lerp(load("models/rm-helpful"), load("models/rm-harmless"), 0.3), batch_size=3)\n'
          'score(h + 0.5 * m, "data/prompts_responses.jsonl", "out/s.jsonl", overwrite=true)\n')


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(tmp_path / "alg-cache"))
    monkeypatch.delenv("ALG_RAY", raising=False)


def status(argv: list[str]) -> int:
    """main()'s exit status, argparse's own usage errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the option: no Ray started -----------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--ray", "bogus"], "'bogus' is not a Ray cluster; the choices are auto"),
    (["--ray", "local:0"], "local:N needs a whole number N >= 1"),
    (["--ray", "local:x"], "local:N needs a whole number N >= 1"),
    (["--ray", "host:99999"], "'host:99999' is not a Ray cluster"),
])
def test_malformed_ray_option_is_a_usage_error(ws, capsys, args, message):
    (ws / "t.alg").write_text(RECIPE)
    assert status(["run", str(ws / "t.alg"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "usage: alg run" in err and "Traceback" not in err


def test_bare_ray_before_the_file_says_where_to_put_it(ws, capsys):
    assert status(["run", "--ray", str(ws / "t.alg")]) == 2
    assert "put it after FILE" in capsys.readouterr().err


def test_malformed_alg_ray_variable_is_a_usage_error_naming_it(ws, capsys, monkeypatch):
    (ws / "t.alg").write_text(RECIPE)
    monkeypatch.setenv("ALG_RAY", "ray:/nowhere")
    assert status(["score", str(ws / "t.alg"), "h", "--data", str(ws / "data/prompts_responses.jsonl"),
                 "--out", str(ws / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "ALG_RAY: 'ray:/nowhere' is not a Ray cluster" in err and "usage: alg score" in err


def test_interpreter_ray_is_checked_once():
    with pytest.raises(AlgUsageError, match="ray: 'nope' is not a Ray cluster"):
        Interpreter(ray="nope")
    assert Interpreter(device="cpu", ray=" local:3 ").options.ray == "local:3"
    assert Interpreter(device="cpu", ray="ray://head:10001").options.ray == "ray://head:10001"
    assert Options().ray == "off"


def test_alg_ray_is_read_once_and_the_option_wins(monkeypatch):
    monkeypatch.setenv("ALG_RAY", "auto")
    assert Options().ray == "auto"
    off = Options(ray="off")
    assert off.ray == "off"
    # replace() (used all over: devices, recipes replayed) must not read the variable again
    assert replace(off, force=True).ray == "off"
    monkeypatch.setenv("ALG_RAY", "")
    assert Options().ray == "off"


def test_cli_option_reaches_the_options(monkeypatch):
    from algebra.cli import build_parser, options_from

    monkeypatch.setenv("ALG_RAY", "auto")
    ap = build_parser()
    commands = next(a for a in ap._actions if a.choices).choices
    # the commands that score take it; check and plan take run's options, to check that run
    assert [n for n, p in commands.items() if "--ray" in p._option_string_actions] == \
        ["run", "check", "plan", "score"]
    assert options_from(ap.parse_args(["run", "f.alg"])).ray == "auto"  # the variable
    assert options_from(ap.parse_args(["run", "f.alg", "--ray", "off"])).ray == "off"
    assert options_from(ap.parse_args(["run", "f.alg", "--ray"])).ray == "local"
    assert options_from(ap.parse_args(["run", "f.alg", "--ray", "10.0.0.1:6379"])).ray == "10.0.0.1:6379"


def test_without_the_ray_package_the_error_says_how_to_install_it(monkeypatch):
    from algebra import distributed

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(AlgRuntimeError, match=r"pip install 'algebra\[ray\]'"):
        distributed.connect("local:2")


def test_an_address_where_nothing_listens_fails_at_once_and_says_so():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process is connected to a cluster already, which connect() keeps")
    import socket

    from algebra import distributed

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(AlgRuntimeError, match=f"--ray {address}: nothing answers at 127.0.0.1:{port}"):
            distributed.connect(address)
    assert not ray.is_initialized()


def test_what_travels_to_an_actor_rebuilds_the_same_model(ws):
    """A checked merge, pickled as an actor receives it, loads to the same weights."""
    import pickle

    from algebra.distributed import dumps_model
    from algebra.reward.models import load_model

    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    checked = session.check(Source(RECIPE, "t.alg"))
    leaves = [t for t in checked.sinks[0].value.reward.walk() if hasattr(t, "model")]
    assert len(leaves) == 2
    for leaf in leaves:
        # loaded first: the merge's files are then mapped (an mmap does not pickle)
        a = load_model(leaf.model, session.options, torch.device("cpu"), torch.float32).state_dict()
        copy = pickle.loads(dumps_model(leaf.model))
        assert copy.node.describe() == leaf.model.node.describe()
        b = load_model(copy, session.options, torch.device("cpu"), torch.float32).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


# ---- on a local Ray cluster ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    # the workers import algebra from this tree, installed or not
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def run(ws: Path, ray: str, out: list[str] | None = None) -> Session:
    lines = out if out is not None else []
    session = Session(Options(device="cpu", ray=ray, out=lines.append), ws, mode="file")
    session.run(Source(RECIPE, "t.alg"))
    return session


@pytest.mark.slow
def test_ray_scores_equal_local_in_row_order_and_share_the_cache(cluster, ws, monkeypatch):
    monkeypatch.setenv("ALG_CACHE", str(ws / "local-cache"))
    local_log: list[str] = []
    run(ws, "off", local_log)
    local = rows(ws / "out/s.jsonl")

    monkeypatch.setenv("ALG_CACHE", str(ws / "ray-cache"))  # empty: Ray scores every text
    ray_log: list[str] = []
    run(ws, "local:2", ray_log)
    on_ray = rows(ws / "out/s.jsonl")
    assert sum("on Ray" in line for line in ray_log) == 2, ray_log  # both models, on Ray
    assert [r["id"] for r in on_ray] == [r["id"] for r in local]
    for a, b in zip(on_ray, local, strict=True):
        assert a["response"] == b["response"]
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6, abs=1e-6)

    # the Ray run's cache serves a local run: nothing is scored again
    again: list[str] = []
    run(ws, "off", again)
    assert any("all 12 text(s) cached" in line for line in again), again
    assert not any(line.startswith("scored") for line in again), again
    assert rows(ws / "out/s.jsonl") == on_ray


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_retried_and_the_output_is_complete(cluster, ws, monkeypatch, tmp_path):
    from algebra import distributed

    monkeypatch.setenv("ALG_CACHE", str(ws / "local-cache"))
    run(ws, "off")
    local = rows(ws / "out/s.jsonl")

    marker = tmp_path / "killed"
    monkeypatch.setenv(distributed.FAULT_ENV, str(marker))
    monkeypatch.setenv("ALG_CACHE", str(ws / "ray-cache"))
    (ws / "t.alg").write_text(RECIPE)
    assert main(["run", str(ws / "t.alg"), "--ray", "local:2", "--device", "cpu", "--quiet"]) == 0
    assert marker.exists()  # a worker did die, on its first batch
    on_ray = rows(ws / "out/s.jsonl")
    assert [r["id"] for r in on_ray] == [r["id"] for r in local]
    for a, b in zip(on_ray, local, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_a_worker_that_is_not_restarted_fails_the_run_with_no_output(cluster, ws, monkeypatch, tmp_path, capsys):
    from algebra import distributed

    monkeypatch.setattr(distributed, "RETRIES", 0)
    monkeypatch.setenv(distributed.FAULT_ENV, str(tmp_path / "killed"))
    # the save runs first, in this process (the hook would kill its Ray task first:
    # tests/test_ray_merge.py): the failed scoring must take it back
    monkeypatch.setattr("algebra.interpreter.shard_writer", lambda options: None)
    (ws / "t.alg").write_text('save(load("models/rm-helpful"), "out/copy")\n'
                              + RECIPE.replace(", overwrite=true", ""))
    assert main(["run", str(ws / "t.alg"), "--ray", "local:2", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Ray workers scoring" in err and "died" in err and "Traceback" not in err
    assert not (ws / "out").exists() or not any((ws / "out").iterdir())  # neither the save nor the scores
    monkeypatch.setenv(distributed.FAULT_ENV, str(tmp_path / "killed-again"))
    with pytest.raises(AlgError, match="died"):  # and the API raises it as an AlgError
        Interpreter(device="cpu", base_dir=ws, ray="local:2", out=lambda _: None).eval(
            'score(reward("models/rm-helpful", batch_size=2), "data/prompts_responses.jsonl", "out/t.jsonl")')
    assert not (ws / "out" / "t.jsonl").exists()


@pytest.mark.slow
def test_a_trl_reward_function_keeps_its_ray_pool_between_calls(cluster, ws, monkeypatch):
    prompts = ["What is 12 plus 30?", "Name a colour.", "Say hi."]
    completions = ["42.", "Blue.", "Hi there, how can I help?"]
    monkeypatch.setenv("ALG_CACHE", str(ws / "local-cache"))
    local = Interpreter(device="cpu", base_dir=ws, out=lambda _: None).eval(
        'r = reward("models/rm-helpful", batch_size=2)')(prompts=prompts, completions=completions)

    monkeypatch.setenv("ALG_CACHE", str(ws / "ray-cache"))
    r = Interpreter(device="cpu", base_dir=ws, ray="local:2", out=lambda _: None).eval(
        'r = reward("models/rm-helpful", batch_size=2)')
    first = r(prompts=prompts[:1], completions=completions[:1])  # one batch: the pool is still 2 wide
    [pool] = r._run._loaded.values()
    assert len(pool.actors) == 2
    got = r(prompts=prompts, completions=completions)
    assert r._run._loaded == {next(iter(r._run._loaded)): pool}  # the same pool served both calls
    assert r.texts_scored == 3
    assert first == pytest.approx(local[:1], rel=1e-6, abs=1e-6)
    assert got == pytest.approx(local, rel=1e-6, abs=1e-6)
    r._run.close()


# ---- generation on Ray ----------------------------------------------------------------------

# prompts of different lengths, so batches are left-padded; batch_size=2 makes more batches
# than workers (greedy: 5 rows in 3 batches; sampling with n=2: 10 rows in 5), so both sample
GEN_PROMPTS = ["Hi", "What is 12 plus 30?", "Write a long poem about the sea, the sky and the rivers, please.",
               "Name a colour.", "Why is the sky blue? Explain it briefly."]


def generated(ws: Path, temperature: float):
    """A checked generate() of the tiny policy: 5 prompts, 2 samples each, 6 tokens."""
    return Interpreter(device="cpu", base_dir=ws, out=lambda _: None).eval(
        f'generate("models/policy", {json.dumps(GEN_PROMPTS)}, n=2, temperature={temperature}, '
        'max_new_tokens=6, seed=3, batch_size=2)')


def sample_texts(ws: Path, g, ray: str) -> tuple[list[tuple], list[str], int]:
    """g's rows (prompt, response, order) sampled by a reward run, its log, its policy loads."""
    from algebra.reward.engine import RewardRun

    log: list[str] = []
    run = RewardRun(Options(device="cpu", ray=ray, out=log.append))
    try:
        run.resolve_generations([g])
        got = [(r.prompt, r.response, r.line) for r in run.generated[g].rows]
    finally:
        run.close()
    return got, log, run.loads


def generation_cache(cache: Path) -> dict[str, str]:
    folder = cache / "generations"
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.json"))}


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_ray_generation_equals_local_in_order_and_shares_the_cache(cluster, ws, monkeypatch, temperature):
    from algebra import distributed
    from algebra.reward.generate import plan_batches

    g = generated(ws, temperature)
    monkeypatch.setenv("ALG_CACHE", str(ws / "local-cache"))
    local, _, loads = sample_texts(ws, g, "off")
    assert loads == 1 and len(local) == 10
    assert len({t for _, t, _ in local}) >= 4  # different texts, so the comparison bites
    if temperature:
        assert any(local[i][1] != local[i + 1][1] for i in range(0, 10, 2))  # a prompt's samples differ

    handed: list = []  # what the driver hands the pool: the local run's batches, in order
    real_run = distributed.Pool.run

    def spy(self, batches, store):
        handed.append((len(self.actors), batches))
        return real_run(self, batches, store)

    monkeypatch.setattr(distributed.Pool, "run", spy)
    monkeypatch.setenv("ALG_CACHE", str(ws / "ray-cache"))  # empty: Ray samples every prompt
    on_ray, log, loads = sample_texts(ws, g, "local:2")
    assert loads == 0 and any("x 2 on Ray" in line for line in log), log  # no policy loaded here
    assert on_ray == local  # texts, prompts and row order
    from transformers import AutoTokenizer

    planned = plan_batches(AutoTokenizer.from_pretrained(ws / "models/policy"), g.spec, g.spec.prompts)
    [(actors, batches)] = handed
    assert actors == 2 and len(batches) == len(planned) >= 3
    assert batches == [(b.input_ids, b.seeds) for b in planned]
    # the same cache files under the same keys: a Ray run and a local run share their samples
    assert generation_cache(ws / "ray-cache") == generation_cache(ws / "local-cache")
    assert len(generation_cache(ws / "ray-cache")) == len(GEN_PROMPTS)
    again, log, loads = sample_texts(ws, g, "off")  # a local run after the Ray run samples nothing
    assert again == local and loads == 0 and not any("sampled" in line for line in log), log


@pytest.mark.slow
def test_a_generation_worker_killed_mid_run_still_gives_identical_texts(cluster, ws, monkeypatch, tmp_path):
    from algebra import distributed

    g = generated(ws, 0.9)
    monkeypatch.setenv("ALG_CACHE", str(ws / "local-cache"))
    local, _, _ = sample_texts(ws, g, "off")
    marker = tmp_path / "killed"
    monkeypatch.setenv(distributed.FAULT_ENV, str(marker))
    monkeypatch.setenv("ALG_CACHE", str(ws / "ray-cache"))
    on_ray, _, _ = sample_texts(ws, g, "local:2")
    assert marker.exists()  # a worker did die, on its first batch
    assert on_ray == local
    assert generation_cache(ws / "ray-cache") == generation_cache(ws / "local-cache")


@pytest.mark.slow
def test_a_generation_worker_that_is_not_restarted_fails_the_run_with_no_output(cluster, ws, monkeypatch,
                                                                               tmp_path, capsys):
    from algebra import distributed

    monkeypatch.setattr(distributed, "RETRIES", 0)
    monkeypatch.setenv(distributed.FAULT_ENV, str(tmp_path / "killed"))
    monkeypatch.setattr("algebra.interpreter.shard_writer", lambda options: None)  # the save runs here, unkilled
    (ws / "t.alg").write_text(
        'save(load("models/rm-helpful"), "out/copy")\n'  # runs first: the failed run must take it back
        f'p = generate("models/policy", {json.dumps(GEN_PROMPTS)}, n=2, max_new_tokens=6, batch_size=2)\n'
        'score(reward("models/rm-helpful"), p, "out/s.jsonl")\n')
    assert main(["run", str(ws / "t.alg"), "--ray", "local:2", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Ray workers generating with" in err and "died" in err and "Traceback" not in err
    assert not (ws / "out").exists() or not any((ws / "out").iterdir())  # neither the save nor the scores


# ---- kl and front on Ray ----------------------------------------------------------------------

# 3 prompts on a pool of 2: both actors sample and weigh. front over the kl's policy with the
# kl's options shares its samples (one KLSpec), so its own work on Ray is the reward's scoring.
KL_PROMPTS = ["What is 12 plus 30?", "Name a colour.", "Why is the sky blue? Explain it briefly."]
KL_OPTIONS = "n=3, max_new_tokens=5, seed=2"
KL_RECIPE = (f'ref = load("models/policy")\n'
             f'kl(load("models/lm"), ref, {json.dumps(KL_PROMPTS)}, {KL_OPTIONS}, out="out/kl.json", '
             'overwrite=true)\n')
FRONT_RECIPE = (KL_RECIPE + f'front([load("models/lm")], ref, reward("models/rm-helpful"), {json.dumps(KL_PROMPTS)}, '
                f'"out/front.json", x=[1.0], xlabel="t", {KL_OPTIONS}, overwrite=true)\n')


def kl_run(ws: Path, text: str, ray: str):
    """The reward run of `text`'s kl/front sinks: its samples and log-ratios by (policy, ref,
    spec), its outputs, and its model loads in this process."""
    from algebra.reward import engine

    session = Session(Options(device="cpu", ray=ray, out=lambda _: None), ws, mode="file")
    checked = session.check(Source(text, "t.alg"))
    run = engine.run_sinks(checked.sinks, session.options)
    samples = {(pm.describe(), ref.describe(), spec): ([(r.prompt, r.response, r.line) for r in v.responses.rows],
                                                       v.logratios) for (pm, ref, spec), v in run.kl.items()}
    outs = {name: json.loads((ws / "out" / name).read_text())
            for name in ("kl.json", "front.json") if (ws / "out" / name).exists()}
    return samples, outs, run.loads


def assert_same_kl(got, want) -> None:
    """The same samples row for row; log-ratios and outputs' numbers within float tolerance."""
    assert got[0].keys() == want[0].keys()
    for k, (rows_got, ratios_got) in got[0].items():
        rows_want, ratios_want = want[0][k]
        assert rows_got == rows_want
        assert ratios_got == pytest.approx(ratios_want, rel=1e-6, abs=1e-6)
    assert got[1].keys() == want[1].keys()
    for name, doc in got[1].items():
        other = want[1][name]
        for a, b in [(doc, other), *zip(doc.get("results", []), other.get("results", []), strict=True)]:
            assert a.keys() == b.keys()
            for key, v in a.items():
                if key != "results":
                    assert v == (pytest.approx(b[key], rel=1e-6, abs=1e-6) if isinstance(v, float) else b[key]), key


@pytest.mark.slow
def test_ray_kl_and_front_equal_local_with_a_worker_killed(cluster, ws, monkeypatch, tmp_path):
    """kl and front on Ray equal the local run, though a sampling worker dies on its first
    prompt (and is restarted): retried prompts give the same samples."""
    from algebra import distributed

    monkeypatch.setenv("ALG_CACHE", str(ws / "local-cache"))
    local = kl_run(ws, FRONT_RECIPE, "off")
    assert local[2] == 3  # here: the policy, the reference and the reward model
    [(rows_, ratios)] = local[0].values()
    assert len(rows_) == 9 and len({t for _, t, _ in rows_}) >= 4  # different texts: the comparison bites
    assert min(abs(r) for r in ratios) > 1e-5  # log-ratios well above the tolerance they are compared with
    assert local[1]["kl.json"]["kl"] > 1e-4 and local[1]["kl.json"]["samples"] == 9
    assert local[1]["front.json"]["results"][0]["kl"] == pytest.approx(local[1]["kl.json"]["kl"], abs=1e-12)

    handed: list = []  # (what, actors, items) of each pool the run used
    real_run = distributed.Pool.run

    def spy(self, items, store):
        handed.append((self.what, len(self.actors), items))
        return real_run(self, items, store)

    monkeypatch.setattr(distributed.Pool, "run", spy)
    monkeypatch.setenv("ALG_CACHE", str(ws / "ray-cache"))  # empty: Ray scores the samples too
    marker = tmp_path / "killed"
    monkeypatch.setenv(distributed.FAULT_ENV, str(marker))
    on_ray = kl_run(ws, FRONT_RECIPE, "local:2")
    assert marker.exists()  # a worker did die, on its first prompt
    assert on_ray[2] == 0  # no model loaded in this process
    # the policy's pool, then the reference's, each 2 wide; then the reward's (its one batch: 1 wide)
    assert [(w.split()[0], a) for w, a, _ in handed] == [("sampling", 2), ("weighing", 2), ("scoring", 1)]
    assert handed[0][2] == KL_PROMPTS  # a prompt per item, in the prompts' order
    assert len(handed[1][2]) == 3 and all(s.ids.shape[0] == 3 for s in handed[1][2])  # each prompt's rows
    assert_same_kl(on_ray, local)


@pytest.mark.slow
def test_a_kl_worker_that_is_not_restarted_fails_the_run_with_no_output(cluster, ws, monkeypatch, tmp_path, capsys):
    from algebra import distributed

    monkeypatch.setattr(distributed, "RETRIES", 0)
    monkeypatch.setenv(distributed.FAULT_ENV, str(tmp_path / "killed"))
    (ws / "t.alg").write_text(KL_RECIPE)
    assert main(["run", str(ws / "t.alg"), "--ray", "local:2", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Ray workers sampling" in err and "died" in err and "Traceback" not in err
    assert not (ws / "out").exists() or not any((ws / "out").iterdir())
