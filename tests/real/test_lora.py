"""lora() on the real model: a LoRA adapter trained by peft on SmolLM2-135M-Instruct (a
few steps on four short texts), merged by alg into the bf16 checkpoint, against the
product computed whole in float32 and rounded once, against peft's merge_and_unload on
the same bf16 model, and against the adapter's own (unmerged) forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from algebra import Interpreter, Options

from .conftest import read_tensors

pytestmark = pytest.mark.real
peft = pytest.importorskip("peft")

TEXTS = [
    "The capital of Australia is Canberra, not Sydney.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The speed of light is about three hundred thousand kilometres a second.",
    "Mount Everest is the highest mountain above sea level.",
]
STEPS, LR = 6, 2e-3


@pytest.fixture(scope="module")
def adapter(real, real_tok, tmp_path_factory):
    """Rank-8 LoRA on every layer's q, v and down projections (lora_alpha 16), trained
    with peft; saved as peft saves it (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real["base"], dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
    batch = real_tok(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
    torch.manual_seed(0)
    pm.train()
    losses = []
    for _ in range(STEPS):
        loss = pm(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out = tmp_path_factory.mktemp("real-lora") / "adapter"
    pm.save_pretrained(out)
    return out, losses


@pytest.fixture(scope="module")
def merged(real, adapter, tmp_path_factory):
    base = tmp_path_factory.mktemp("real-lora-out")
    Interpreter(options=Options(device="cpu", out=lambda s: None), base_dir=base).eval(
        f'save(lora(load("{real["base"]}"), "{adapter[0]}"), "merged")')
    return base / "merged"


def test_the_adapter_learned(adapter):
    losses = adapter[1]
    assert losses[-1] < 0.8 * losses[0], losses


def test_merged_weights_are_the_product_rounded_once(real, adapter, merged):
    from safetensors.torch import load_file

    cfg = json.loads((adapter[0] / "adapter_config.json").read_text())
    ad = load_file(adapter[0] / "adapter_model.safetensors")
    base, got = read_tensors(real["base"]), read_tensors(merged)
    assert set(got) == set(base) and all(got[k].dtype == torch.bfloat16 for k in got)
    s = cfg["lora_alpha"] / cfg["r"]
    adapted = 0
    for key, a in ad.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        b = ad[key.replace("lora_A", "lora_B")]
        want = (base[name].float() + (b @ a) * s).to(torch.bfloat16)  # the whole product, one rounding
        assert torch.equal(got[name], want), name
        f64 = base[name].double() + s * (b.double() @ a.double())
        # within half a bf16 step of the exact value (one rounding), and not the base
        assert ((got[name].double() - f64).abs() <= f64.abs() * 2.0 ** -8 + 1e-6).all(), name
        assert not torch.equal(got[name], base[name]), name
        adapted += 1
    assert adapted == 30 * 3
    for name in got.keys() - {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                              for k in ad if ".lora_A." in k}:
        assert torch.equal(got[name], base[name]), name


def test_equals_peft_s_merge_of_the_bf16_model(real, adapter, merged):
    """peft keeps the adapter in float32 and adds its float32 product into the bf16 weight
    (`weight += delta`: computed in float32, rounded once): alg's merge, bit for bit."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real["base"], dtype=torch.bfloat16)
    theirs = peft.PeftModel.from_pretrained(model, adapter[0]).merge_and_unload().state_dict()
    ours = read_tensors(merged)
    assert set(theirs) - {"lm_head.weight"} == set(ours)  # lm_head: tied to the embeddings
    for name, t in ours.items():
        assert torch.equal(theirs[name], t), name


def test_merged_model_computes_what_the_adapter_does(real, real_tok, adapter, merged):
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(real["base"], dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, adapter[0])  # unmerged, float32
    batch = real_tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        lo, lt = ours(**batch).logits, theirs(**batch).logits
    mask = batch["attention_mask"].bool()
    # bf16 weights against float32 ones: the logits agree to bf16's precision, and the
    # next-token choices almost everywhere
    assert (lo[mask] - lt[mask]).abs().max() < 0.05 * lt[mask].abs().max()
    agree = (lo.argmax(-1) == lt.argmax(-1))[mask].float().mean().item()
    assert agree > 0.95, agree
