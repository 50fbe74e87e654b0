"""Merges on Ray (`save` under `alg run --ray`, algebra/distributed_merge.py).

Without a cluster (default tier): who writes the shards follows the option, and a save
under --ray without the ray package says how to install it and leaves nothing. On the
local Ray cluster of 2 CPUs that tests/test_ray.py's `cluster` fixture starts
(once for this module), so in the `slow` tier (`pytest -m slow tests/test_ray_merge.py`):
lerp, SLERP with per-layer angles (a chain of Gram reductions), TIES, DARE-TIES,
DELLA, RAM, RAM+, Arcee Fusion and a LoRA adapter merged in, saved in several shards by a local run and by a Ray run, compare byte for byte,
every file of the folder (shards, index, config, tokenizer, card); the driver computes
nothing (its executor is disabled during the Ray run); a task killed mid-shard is run
again and the folder is still complete and identical; a task that keeps dying, or a task
that raises (a non-finite result), fails the run with an AlgError and leaves no output;
two saves of one SLERP in a run compute its angles once; a task that does not see the
save's folder (not on a shared filesystem) says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_ray import cluster  # noqa: F401  (the module's local 2-CPU cluster, a fixture)

from algebra import AlgError, Interpreter, Options
from algebra.cli import main
from algebra.interpreter import Session
from algebra.source import Source

# shard_size: a 64-wide, 2-layer tiny Llama (~0.4 MB in float32) in several shards, so
# both workers write; chunk 4096 (the users' floor): several chunks per large tensor
SHARD = 'shard_size="100KB"'
MERGES = {
    "lerp": "lerp(b, m1, 0.3)",
    "slerp": "slerp([m1, m2, m3], base=b, per=\"layer\")",  # WARP: a chain of per-layer Grams
    "ties": "ties(b, [m1, m2], [1, 0.7], 0.5)",
    "dare_ties": "dare_ties(b, [m1, m2], 1, 0.5, seed=4)",
    "della": "della(b, [m1, m2], [1, 0.8], 0.5, epsilon=0.2, seed=11)",
    "ram": "ram(b, [m1, m2])",
    "ramplus_tl": "ramplus_tl(b, [m1, m2], r=0.5, alpha=2)",  # per-tensor counts
    "arcee_fusion": "arcee_fusion(b, m1)",  # per-tensor quartiles
    "lora": 'lora(b, "models/adapter")',  # a PEFT adapter (made by the test that runs it)
}
HEAD = ('b = load("models/base")\nm1 = load("models/math")\nm2 = load("models/rl1")\n'
        'm3 = load("models/rl2")\n')


def recipe(names=MERGES, overwrite: bool = True) -> str:
    ow = ", overwrite=true" if overwrite else ""
    return HEAD + "".join(f'save({MERGES[n]}, "out/{n}", {SHARD}{ow})\n' for n in names)


@pytest.fixture
def mws(tmp_path, family) -> Path:
    (tmp_path / "models").mkdir()
    for name, path in family.items():
        (tmp_path / "models" / name).symlink_to(path)
    return tmp_path


def run(ws: Path, ray: str, text: str, out: list[str] | None = None) -> None:
    lines = out if out is not None else []
    session = Session(Options(device="cpu", ray=ray, chunk_elems=4096, out=lines.append), ws, mode="file")
    session.run(Source(text, "t.alg"))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_shards_are_written_by_ray_tasks_only_under_ray():
    from algebra.distributed_merge import shard_writer, write_shards

    assert shard_writer(Options(ray="off")) is None
    assert shard_writer(Options(ray="local:2")) is write_shards
    assert shard_writer(Options(ray="ray://head:10001")) is write_shards


def test_a_save_under_ray_without_the_package_says_how_to_install_it_and_leaves_nothing(mws, monkeypatch,
                                                                                        capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    (mws / "t.alg").write_text(recipe(["lerp"]))
    assert main(["run", str(mws / "t.alg"), "--ray", "local:2", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'algebra[ray]'" in err and "Traceback" not in err, err
    assert not (mws / "out").exists()


@pytest.mark.slow
def test_merges_on_ray_equal_local_byte_for_byte(cluster, mws, monkeypatch):  # noqa: F811
    from test_lora import _adapter

    from algebra import execute

    _adapter(mws / "models" / "base", mws / "models" / "adapter", 5, r=4, lora_alpha=8)
    run(mws, "off", recipe())
    local = {n: files(mws / "out" / n) for n in MERGES}
    for n, got in local.items():  # several shards, plus the rest of the folder
        assert sum(f.endswith(".safetensors") for f in got) >= 3, (n, sorted(got))
        assert {"model.safetensors.index.json", "config.json", "README.md", "tokenizer.json"} <= got.keys()

    def no_local_compute(*a, **k):
        raise AssertionError("the driver computed a tensor plan itself")

    monkeypatch.setattr(execute, "run_tensor_plan", no_local_compute)
    log: list[str] = []
    run(mws, "local:2", recipe(), log)
    ray_lines = [line for line in log if " on Ray: " in line]
    assert len(ray_lines) == len(MERGES), log
    by_merge = dict(zip(MERGES, ray_lines, strict=True))
    for n in ("lerp", "dare_ties", "della", "ram", "lora"):  # elementwise, or row by row (DELLA's ranks)
        assert "reduction task" not in by_merge[n], by_merge[n]
    for n in ("slerp", "ties", "ramplus_tl", "arcee_fusion"):  # per-layer angles; per-tensor thresholds
        assert "reduction task" in by_merge[n], by_merge[n]
    for n in MERGES:
        on_ray = files(mws / "out" / n)
        assert on_ray.keys() == local[n].keys(), n
        for f in on_ray:
            assert on_ray[f] == local[n][f], f"{n}/{f} differs between the local and the Ray run"
    assert not [p for p in (mws / "out").iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.slow
def test_a_shard_task_killed_mid_write_is_run_again_and_the_folder_is_complete(cluster, mws, monkeypatch,  # noqa: F811
                                                                               tmp_path):
    from algebra import distributed

    text = recipe(["slerp"])
    run(mws, "off", text)
    local = files(mws / "out" / "slerp")
    marker = tmp_path / "killed"
    monkeypatch.setenv(distributed.FAULT_ENV, str(marker))
    (mws / "t.alg").write_text(text)
    assert main(["run", str(mws / "t.alg"), "--ray", "local:2", "--device", "cpu", "--chunk", "4096",
                 "--quiet"]) == 0
    assert marker.exists()  # a task did die, after its first chunk
    assert files(mws / "out" / "slerp") == local


@pytest.mark.slow
def test_a_task_that_keeps_dying_fails_the_run_and_leaves_no_output(cluster, mws, monkeypatch, tmp_path,  # noqa: F811
                                                                    capsys):
    from algebra import distributed

    monkeypatch.setattr(distributed, "RETRIES", 0)
    monkeypatch.setenv(distributed.FAULT_ENV, str(tmp_path / "killed"))
    (mws / "t.alg").write_text(recipe(["lerp", "ties"], overwrite=False))
    assert main(["run", str(mws / "t.alg"), "--ray", "local:2", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "died and was run again 0 time(s)" in err and "Traceback" not in err, err
    assert not (mws / "out").exists()  # no folder, no temporary, not even the parent it made
    monkeypatch.setenv(distributed.FAULT_ENV, str(tmp_path / "killed-again"))
    interp = Interpreter(device="cpu", base_dir=mws, ray="local:2", out=lambda _: None)
    with pytest.raises(AlgError, match="died"):  # the API raises it as an AlgError
        interp.eval(HEAD + f'save(lerp(b, m1, 0.5), "out/api", {SHARD})')
    assert not (mws / "out").exists()


@pytest.mark.slow
def test_a_task_error_is_the_users_error_at_the_save_and_leaves_no_output(cluster, mws):  # noqa: F811
    # 1e40 times weights of about 0.02-0.1 overflows float32: the task raises, the driver re-raises it
    text = HEAD + 'save(b * 1e40, "out/inf")\n'
    with pytest.raises(AlgError) as e:
        run(mws, "local:2", text)
    assert "is not finite" in e.value.message
    assert e.value.span is not None and e.value.span.line == 5
    assert not (mws / "out").exists()
    assert not os.path.exists(mws / "out" / "inf")


@pytest.mark.slow
def test_a_reduction_the_run_has_computed_is_not_computed_again(cluster, mws):  # noqa: F811
    # two saves of one SLERP in one run share its angles, as in a local run
    text = HEAD + "".join(f'save({MERGES["slerp"]}, "out/{n}", {SHARD})\n' for n in ("x", "y"))
    log: list[str] = []
    run(mws, "local:2", text, log)
    first, second = [line for line in log if " on Ray: " in line]
    assert "reduction task" in first and "reduction task" not in second, log
    x, y = files(mws / "out" / "x"), files(mws / "out" / "y")
    assert x.pop("README.md") != y.pop("README.md")  # the card is titled by the folder's name
    assert x == y


@pytest.mark.slow
def test_a_task_that_does_not_see_the_folder_says_it_must_be_shared(cluster, mws):  # noqa: F811
    from algebra.distributed_merge import write_shards
    from algebra.errors import AlgIOError
    from algebra.plan import plan_save

    session = Session(Options(device="cpu", ray="local:2", out=lambda _: None), mws, mode="file")
    [sink] = session.check(Source(recipe(["lerp"]), "t.alg")).sinks
    sp = plan_save(sink.value, session.options)
    # as on a node where the driver's folder is not mounted
    with pytest.raises(AlgIOError, match="must be on a filesystem every node of the cluster sees") as e:
        write_shards(sp, session.options, mws / "not-mounted")
    assert "not-mounted" in e.value.message
    assert e.value.span.location() == sink.span.location()  # at the save
