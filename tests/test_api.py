"""The embeddable surface: Interpreter.eval with bindings, Results, and every stage alone."""

from __future__ import annotations

import pytest
import torch

from algebra import AlgError, Interpreter, Options, Result, api
from algebra.errors import AlgTypeError


def test_eval_returns_python_values():
    it = Interpreter(device="cpu")
    assert it.eval("1 + 2 * 3") == 7
    assert it.eval('"out/m-" + str(0.5)') == "out/m-0.5"
    assert it.eval("[x * 2 for x in range(3)]") == [0, 2, 4]
    assert it.eval("a = 1") is None
    # the session persists between calls, like a REPL
    it.eval("def twice(x) = 2 * x")
    assert it.eval("twice(21)") == 42


def test_eval_errors_are_positioned():
    with pytest.raises(AlgError) as info:
        Interpreter(device="cpu").eval("x = 1\nlerp(x)")
    text = info.value.format()
    assert text.startswith("<eval>:2:1: error: lerp() is missing argument")
    assert "lerp(x)" in text


def test_path_binding_result_and_save(family, tmp_path, read):
    it = Interpreter(device="cpu")
    res = it.eval("merge(rm, lm, 0.3)", rm=str(family["rm"]), lm=family["math"])
    assert isinstance(res, Result)
    assert "score.weight" in res.tensors and "lm_head.weight" not in res.tensors
    assert res.tensors["score.weight"] == ((1, 64), "float32")
    assert "predicted peak working memory" in res.plan()
    sd = res.state_dict()
    out = res.save(tmp_path / "m")
    disk = read(out)
    assert sd.keys() == disk.keys()
    for k in sd:
        assert torch.equal(sd[k], disk[k])
    assert "merge(rm, lm, 0.3)" in (out / "README.md").read_text()
    with pytest.raises(AlgError, match="already exists"):
        res.save(tmp_path / "m")


def test_module_binding_and_dtype(family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family["math"])
    it = Interpreter(device="cpu")
    res = it.eval("task_vector(m, base)", m=model, base=str(family["base"]))
    assert res.model.type.architecture == "LlamaForCausalLM"  # from the module's config
    tv = res.state_dict(dtype="bfloat16")
    name = "model.layers.1.mlp.down_proj.weight"
    ref = model.state_dict()[name].double() - Interpreter(device="cpu").eval("b", b=str(family["base"])).state_dict()[name].double()
    assert tv[name].dtype == torch.bfloat16
    torch.testing.assert_close(tv[name].double(), ref.to(torch.bfloat16).double(), rtol=8e-3, atol=1e-6)


def test_ema_every_step_of_a_training_loop():
    """The use the issue names: an EMA update each step, in memory, on the model's device."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    it = Interpreter(device="auto")
    avg = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = {k: v.detach().double().clone() for k, v in avg.items()}
    mu = 0.1
    for _ in range(5):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg = it.eval("ema([avg, cur], mu)", avg=avg, cur=model, mu=mu).state_dict()
        ref = {k: (1 - mu) * ref[k] + mu * v.detach().double() for k, v in model.state_dict().items()}
    for k, v in avg.items():
        assert v.device == next(model.parameters()).device
        torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-7)
        assert not torch.equal(v, model.state_dict()[k])


def test_dict_bindings_do_not_alias_their_inputs():
    a = {"w": torch.ones(3)}
    b = {"w": torch.full((3,), 3.0)}
    out = Interpreter(device="cpu").eval("a * 1", a=a).state_dict()
    out["w"].add_(5)
    assert torch.equal(a["w"], torch.ones(3))  # the result is a copy, not a view
    out = Interpreter(device="cpu").eval("lerp(a, b, 0.5)", a=a, b=b).state_dict()
    assert torch.equal(out["w"], torch.full((3,), 2.0))


def test_bad_binding():
    with pytest.raises(AlgTypeError, match="binding 'x': cannot use a set"):
        Interpreter(device="cpu").eval("x", x={1, 2})


def test_every_stage_on_its_own(family, tmp_path):
    text = f'a = load("{family["base"]}"); b = load("{family["math"]}")\nsave(lerp(a, b, 0.3), "out")\nlerp(a, b, 0.3)'
    program = api.parse(text, "t.alg")
    assert len(program.stmts) == 4
    checked = api.check(program, base_dir=tmp_path, options=Options(device="cpu"))
    assert [s.kind for s in checked.sinks] == ["save"]
    graph = api.build(checked)
    ops = sorted(n.op for n in graph.nodes)
    # the lerp written twice is one subgraph: 2 loads, 2 scales, 1 add
    assert ops == ["add", "load", "load", "scale", "scale"]
    exprs = api.lower(checked.result)
    assert set(exprs) == set(checked.result.type.tensors)
    plan = api.plan(checked.result, Options(device="cpu"))
    tensors = api.execute(plan, Options(device="cpu"))
    save_plan = api.plan(checked.sinks[0].value, Options(device="cpu"))
    folder = api.save(save_plan, text, Options(device="cpu"))
    assert (folder / "config.json").is_file()
    from safetensors.torch import load_file

    disk = load_file(next(folder.glob("*.safetensors")))
    assert all(torch.equal(disk[k], tensors[k]) for k in tensors)
