"""lora(m, adapter): a PEFT LoRA adapter merged into its base, against peft's own
merge_and_unload (adapters made by peft) and a float64 reference formula; every refusal
positioned at the adapter argument before anything is written (algebra/methods/lora.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quiet_interpreter, read_folder

from algebra import AlgError, Options

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _adapter(base: Path, out: Path, seed: int, **cfg) -> Path:
    """A peft adapter on `base` whose lora_B (zero at init) and trained-whole lm_head are
    set to seeded values, as training would leave them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "plain": _adapter(family["base"], root / "plain", 1, r=4, lora_alpha=8),
        # per-module rank and alpha, a head trained whole, rank-stabilised scaling
        "patterns": _adapter(family["base"], root / "patterns", 2, r=4, lora_alpha=8,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
                             modules_to_save=["lm_head"], use_rslora=True),
    }


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in peft.PeftModel.from_pretrained(model, adapter)
            .merge_and_unload().state_dict().items()}


def _reference(base: Path, adapter: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """W + scale * s * B @ A in float64, from the files and the config by peft's documented
    rules (s = alpha / r, alpha / sqrt(r) with use_rslora; patterns match a name's end)."""
    import re

    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ad = load_file(adapter / "adapter_model.safetensors")
    out = {k: v.double() for k, v in read_folder(base).items()}
    for key, t in ad.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_" not in name:
            out[name] = t.double()
            continue
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removesuffix(".lora_A.weight")
        a, b = t.double(), ad[key.replace("lora_A", "lora_B")].double()
        r = a.shape[0]
        alpha = next((v for k, v in cfg["alpha_pattern"].items() if re.match(rf"(.*\.)?({k})$", module)),
                     cfg["lora_alpha"])
        s = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
        out[module + ".weight"] = out[module + ".weight"] + scale * s * (b @ a)
    return out


def _run(tmp_path: Path, expr: str, **opts) -> dict[str, torch.Tensor]:
    interp = quiet_interpreter(tmp_path, **opts)
    return interp.eval(expr).state_dict()


@pytest.mark.parametrize("kind", ["plain", "patterns"])
@pytest.mark.parametrize("chunk", [None, 96])  # 96: chunks of a few rows (in = 64 or 128)
def test_equals_peft_merge_and_unload_bit_for_bit(family, adapters, tmp_path, kind, chunk):
    opts = {"chunk_elems": chunk} if chunk else {}
    got = _run(tmp_path, f'lora(load("{family["base"]}"), "{adapters[kind]}")', **opts)
    ref = _peft_merged(family["base"], adapters[kind])
    assert set(got) == set(ref)
    changed = 0
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
        changed += not torch.equal(v, read_folder(family["base"])[k])
    assert changed == 6 + (kind == "patterns")  # 2 layers x (q, v, down), and the lm_head trained whole
    f64 = _reference(family["base"], adapters[kind])
    for k, v in got.items():
        torch.testing.assert_close(v.double(), f64[k], rtol=1e-6, atol=1e-6)


def test_scale_and_composition_match_the_reference(family, adapters, tmp_path):
    base, ad = family["base"], adapters["plain"]
    half = _run(tmp_path, f'lora(load("{base}"), "{ad}", scale=0.5)')
    f64 = _reference(base, ad, 0.5)
    for k, v in half.items():
        torch.testing.assert_close(v.double(), f64[k], rtol=1e-6, atol=1e-6)
    same = _run(tmp_path, f'lora(load("{base}"), "{ad}", scale=0)')
    assert all(torch.equal(v, read_folder(base)[k]) for k, v in same.items())
    # a merged adapter is a checkpoint like any other: its task vector, added to math
    tv = _run(tmp_path, f'b = load("{base}")\nload("{family["math"]}") + (lora(b, "{ad}") - b)')
    full, math_ = _reference(base, ad), read_folder(family["math"])
    for k, v in tv.items():
        want = math_[k].double() + full[k] - read_folder(base)[k].double()
        torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-6)


def test_saved_merge_loads_in_transformers_with_peft_s_logits(family, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    interp = quiet_interpreter(tmp_path)
    interp.eval(f'save(lora(load("{family["base"]}"), "{adapters["patterns"]}"), "out")')
    card = (tmp_path / "out" / "README.md").read_text()
    assert 'patterns")`' in card and "lora(load(" in card  # the expression names the adapter folder
    assert "| `adapter_model.safetensors` |" in card  # its weights are an input, hashed
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, adapters["patterns"])  # unmerged: the adapter's forward
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def _edited(adapter: Path, tmp_path: Path, cfg: dict | None = None, drop: str | None = None) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(adapter, out)
    if cfg:
        data = json.loads((out / "adapter_config.json").read_text())
        data.update(cfg)
        (out / "adapter_config.json").write_text(json.dumps(data))
    if drop:
        from safetensors.torch import load_file, save_file

        t = load_file(out / "adapter_model.safetensors")
        save_file({k: v for k, v in t.items() if drop not in k}, out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize("edit, message", [
    ({"cfg": {"use_dora": True}}, "lora(): the adapter uses DoRA (its magnitude vectors) (use_dora: True), "
                                  "which alg does not merge"),
    ({"cfg": {"fan_in_fan_out": True}}, "lora(): the adapter uses a Conv1D layout (GPT-2's transposed weights) "
                                        "(fan_in_fan_out: True), which alg does not merge"),
    ({"cfg": {"peft_type": "IA3"}}, "lora(): '{ad}' is an adapter of PEFT type 'IA3'; lora() merges LoRA adapters"),
    ({"cfg": {"r": 8}}, "lora(): 'model.layers.0.mlp.down_proj' has rank 4 but adapter_config.json says 8"),
    ({"cfg": {"lora_alpha": "x"}}, "lora(): adapter_config.json's lora_alpha must be a positive number, not 'x'"),
    ({"cfg": {"use_rslora": "yes"}}, "lora(): adapter_config.json's use_rslora must be true or false, not 'yes'"),
    ({"cfg": {"alpha_pattern": {"q_proj": "x"}}},
     "lora(): adapter_config.json's alpha_pattern['q_proj'] must be a positive number, not 'x'"),
    ({"cfg": {"rank_pattern": {"(": 2}}}, "lora(): adapter_config.json's rank_pattern key '(' is not a regular "
                                          "expression (missing ), unterminated subpattern at position 0)"),
    ({"cfg": {"rank_pattern": [2]}}, "lora(): adapter_config.json's rank_pattern must map module names to "
                                     "numbers, not [2]"),
    ({"drop": "layers.1.self_attn.v_proj.lora_B"},
     "lora(): module 'model.layers.1.self_attn.v_proj' has lora_A.weight but not lora_B.weight"),
])
def test_what_alg_does_not_merge_is_refused_at_the_adapter(family, adapters, tmp_path, edit, message):
    ad = _edited(adapters["plain"], tmp_path, **edit)
    interp = quiet_interpreter(tmp_path)
    recipe = f'save(lora(load("{family["base"]}"), "{ad}"), "out")'
    with pytest.raises(AlgError) as info:
        interp.eval(recipe)
    assert info.value.message == message.format(ad=ad)
    assert info.value.span.text() == f'"{ad}"'
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_model_or_without_safetensors_is_refused(family, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    interp = quiet_interpreter(tmp_path)
    other = _edited(adapters["plain"], tmp_path)  # an adapter for a model with more layers
    t = load_file(other / "adapter_model.safetensors")
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in t.items()}, other / "adapter_model.safetensors")
    with pytest.raises(AlgError, match=r"adapts 'model\.layers\.7\.mlp\.down_proj', but m has no tensor"):
        interp.eval(f'lora(load("{family["base"]}"), "{other}")')
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapters["plain"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AlgError, match="holds adapter_model.bin, a pickle, which alg does not load"):
        interp.eval(f'lora(load("{family["base"]}"), "{pickled}")')
    with pytest.raises(AlgError, match="is not a PEFT adapter folder: it has no adapter_config.json"):
        interp.eval(f'lora(load("{family["base"]}"), "{tmp_path}")')
    with pytest.raises(AlgError, match="is longer than the system allows"):  # a stat that raised
        interp.eval(f'lora(load("{family["base"]}"), "{"x" * 5000}")')


def test_any_range_of_the_product_has_the_bits_of_the_write_pass(family, adapters):
    """A reduction's chunks need not be whole blocks of rows: any range [e0, e1) of the
    lowered product equals the same elements of one whole evaluation, bit for bit."""
    from algebra import api
    from algebra.execute import new_evaluator
    from algebra.lower import Lowerer

    m = api.check(api.parse(f'lora(load("{family["base"]}"), "{adapters["patterns"]}")')).result
    name = "model.layers.1.mlp.down_proj.weight"  # [64, 128], rank 2
    expr = Lowerer().tensor(m.node, name)
    ev = new_evaluator(Options(device="cpu"))
    n = expr.numel
    whole = expr.eval(ev, 0, n).clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        e0, e1 = sorted(torch.randint(0, n + 1, (2,), generator=g).tolist())
        if e0 < e1:
            assert torch.equal(expr.eval(ev, e0, e1), whole[e0:e1]), (e0, e1)
