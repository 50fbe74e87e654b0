"""save(): the folder it writes is what transformers loads, and failures leave nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import quiet_interpreter

from algebra import AlgError, Options


def _interp(base: Path, **kw):
    return quiet_interpreter(base, **kw)


def test_folder_layout_and_transformers_reload(family, tmp_path, read):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = f'save(merge(load("{family["rm"]}"), load("{family["math"]}"), 0.3), "out/rm")'
    _interp(tmp_path).eval(recipe)
    out = tmp_path / "out" / "rm"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "README.md", "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    ])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["dtype"] == "float32"
    # transformers loads it as it is, and its forward pass uses the merged weights
    model = AutoModelForSequenceClassification.from_pretrained(out)
    ref = AutoModelForSequenceClassification.from_pretrained(family["rm"])
    rm, lm = read(family["rm"]), read(family["math"])
    ref.load_state_dict({n: (0.7 * t.double() + 0.3 * lm[n].double()).float() if n in lm else t for n, t in rm.items()})
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["What is 12 plus 30?", "Merging checkpoints"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, ref(**ids).logits, rtol=1e-5, atol=1e-5)


def test_dtype_conversion_updates_config(family_bf16, tmp_path, read):
    interp = _interp(tmp_path)
    interp.eval(f'a = load("{family_bf16["base"]}"); save(a * 1, "bf"); save(a * 1, "f32", dtype="float32")')
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    bf, f32, src = read(tmp_path / "bf"), read(tmp_path / "f32"), read(family_bf16["base"])
    for name, t in src.items():
        assert bf[name].dtype == torch.bfloat16 and torch.equal(bf[name], t)
        assert f32[name].dtype == torch.float32 and torch.equal(f32[name], t.float())


def test_shards_and_index(family, tmp_path, read):
    _interp(tmp_path).eval(f'save(load("{family["base"]}") * 1, "out", shard_size="40KB")')
    out = tmp_path / "out"
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 3
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, fname in index["weight_map"].items():
        from safetensors import safe_open

        with safe_open(out / fname, "pt") as f:
            assert name in f.keys()
    assert read(out).keys() == read(family["base"]).keys()
    # no shard exceeds the limit unless it holds a single larger tensor
    for s in shards:
        from safetensors import safe_open

        with safe_open(s, "pt") as f:
            keys = list(f.keys())
        assert len(keys) == 1 or s.stat().st_size <= 40_000 + 8 + 4096


def test_card_has_recipe_and_input_hashes(family, tmp_path):
    recipe = f'# my recipe\nsave(lerp(load("{family["base"]}"), load("{family["math"]}"), 0.25), "out")'
    _interp(tmp_path).eval(recipe)
    card = (tmp_path / "out" / "README.md").read_text()
    # the recipe, its inputs' absolute paths shown by name (they lie outside its folder)
    assert '# my recipe\nsave(lerp(load("base"), load("math"), 0.25), "out")' in card
    for name in ("base", "math"):
        digest = hashlib.sha256((family[name] / "model.safetensors").read_bytes()).hexdigest()
        assert f"| `{name}` | `model.safetensors` | `{digest}` |" in card
    assert "LlamaForCausalLM" in card


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card[4 : card.index("\n---\n", 4)])


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def test_card_has_no_machine_paths_and_no_placeholder_link(family, tmp_path):
    # inputs inside the recipe's folder (relative), one given by an absolute path inside it,
    # and one outside it (absolute); the save target absolute too
    _link(family["base"], tmp_path / "models" / "base")
    _link(family["math"], tmp_path / "models" / "math")
    recipe = (f'a = load("models/base")\nb = load("{tmp_path}/models/math")\nc = load("{family["rl1"]}")\n'
              f'save(merge(a, b, 0.5) + 0.1 * (c - a), "{tmp_path}/out/m")')
    _interp(tmp_path).eval(recipe)
    card = (tmp_path / "out" / "m" / "README.md").read_text()
    for machine in (str(tmp_path), str(family["base"].parent), str(Path.home()), "/tmp/"):
        assert machine not in card
    assert "https://github.com/)" not in card and "](" not in card  # no placeholder link
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    digests = {n: hashlib.sha256((family[n] / "model.safetensors").read_bytes()).hexdigest()
               for n in ("base", "math", "rl1")}
    assert sorted(rows) == sorted([
        f"| `models/base` | `model.safetensors` | `{digests['base']}` |",
        f"| `models/math` | `model.safetensors` | `{digests['math']}` |",
        f"| `rl1` | `model.safetensors` | `{digests['rl1']}` |",
    ])
    assert 'b = load("models/math")' in card and 'c = load("rl1")' in card and '"out/m")' in card
    assert 'load("models/base")' in card.split("- expression:")[1].splitlines()[0]
    assert "base_model" not in _front_matter(card)  # no input names a Hub id


def test_card_base_model_from_hub_named_folders_and_name_or_path(family, tmp_path):
    import shutil

    # a folder given as org/name, a Hub cache snapshot, and a copy whose config names the
    # Hub id it was loaded from (transformers' `_name_or_path`); a machine path there is no id
    _link(family["base"], tmp_path / "HuggingFaceTB" / "SmolLM2-135M")
    _link(family["rl1"], tmp_path / "hub" / "models--org--rl-one" / "snapshots" / "abc123")
    for name, named in (("math", "someone/math-7b"), ("rl2", str(family["rl2"]))):
        shutil.copytree(family[name], tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg["_name_or_path"] = named
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    _interp(tmp_path).eval(
        'a = load("HuggingFaceTB/SmolLM2-135M")\n'
        'save(ties(a, [load("math"), load("hub/models--org--rl-one/snapshots/abc123"), load("rl2")], [1, 1, 1], 0.5), "out")')
    card = (tmp_path / "out" / "README.md").read_text()
    assert _front_matter(card)["base_model"] == ["HuggingFaceTB/SmolLM2-135M", "someone/math-7b", "org/rl-one"]
    assert str(family["rl2"]) not in card
    # one Hub input: a single value
    _interp(tmp_path).eval('save(load("HuggingFaceTB/SmolLM2-135M") * 1, "out1")')
    assert _front_matter((tmp_path / "out1" / "README.md").read_text())["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def test_card_names_a_lone_weight_file_s_folder_only_when_it_is_the_folder_s_one_file():
    from algebra.io.card import hub_id

    here = Path("/nowhere")
    assert hub_id(here, "org/model/model.safetensors", None) == "org/model"
    assert hub_id(here, "predibase/gsm8k/adapter_model.safetensors", None) == "predibase/gsm8k"  # lora()'s input
    assert hub_id(here, "adapter/adapter_model.safetensors", None) is None  # a local folder, no org
    assert hub_id(here, "weights/merged.safetensors", None) is None  # a file, not a repository


@pytest.mark.parametrize("s, ok", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("org/name.v1", True), ("a/b", True),
    ("org/name/extra", False), ("/abs/path", False), ("org", False), ("org/-bad", False),
    ("org/na..me", False), ("org/na--me", False), ("./x", False), (None, False), ("../x", False),
])
def test_hub_id_rule(s, ok):
    from algebra.io.card import is_hub_id

    assert is_hub_id(s) is ok


def test_failure_leaves_nothing(family, tmp_path):
    interp = _interp(tmp_path)
    with pytest.raises(AlgError, match="not finite"):
        interp.eval(f'b = load("{family["base"]}"); save(1 / (b - b), "out/x")')
    assert not (tmp_path / "out" / "x").exists()
    assert not (tmp_path / "out").exists()  # the parent folder the save made goes too


def test_existing_output_refused_then_replaced(family, tmp_path, read):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    interp = _interp(tmp_path)
    with pytest.raises(AlgError, match="already exists"):
        interp.eval(f'save(load("{family["base"]}") * 2, "out")')
    assert (target / "keep.txt").read_text() == "mine"
    # overwrite replaces only a model folder: this one holds a file of the user's
    with pytest.raises(AlgError, match="holds 'keep.txt', which is not a model file"):
        interp.eval(f'save(load("{family["base"]}") * 2, "out", overwrite=true)')
    assert (target / "keep.txt").read_text() == "mine"
    (target / "keep.txt").rename(target / "config.json")
    interp.eval(f'save(load("{family["base"]}") * 2, "out", overwrite=true)')
    base = read(family["base"])
    assert torch.equal(read(target)["model.norm.weight"], base["model.norm.weight"] * 2)
    # --force is the same as overwrite=true
    _interp(tmp_path, force=True).eval(f'save(load("{family["base"]}") * 3, "out")')
    assert torch.allclose(read(target)["model.norm.weight"], base["model.norm.weight"] * 3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_generation_config_and_tokenizer_come_from_primary(family, tmp_path):
    _interp(tmp_path).eval(f'save(lerp(load("{family["math"]}"), load("{family["base"]}"), 0.5), "out")')
    out = tmp_path / "out"
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (family["math"] / f).read_bytes()


def test_cse_shared_subexpression_is_one_node(family, tmp_path):
    """The same subexpression written twice is one graph node."""
    from algebra.check import Checker
    from algebra.graph import build
    from algebra.parser import parse

    ck = Checker(Options(device="cpu"), tmp_path, mode="eval")
    text = f'''a = load("{family["base"]}"); b = load("{family["math"]}")
x = lerp(a, b, 0.3) - a
y = lerp(a, b, 0.3) - b
save(x + y, "out")'''
    sink = ck.check(parse(text)).sinks[0]
    g = build([sink.value.model.node])
    lerps = [n for n in g.nodes if n.op == "add" and all(a.op == "scale" for a in n.args)]
    assert len(lerps) == 1  # (1-t)*a + t*b built once though written twice
    assert [n.op for n in g.nodes].count("load") == 2
