"""Every merge method on the real model's tensors (a subset: conftest.SUBSET_*) against the float64 references of the method tests, which are written
from each method's documented rule. The inputs are the bf16 weights as stored; alg
computes in float64, so each comparison is to 1e-10 of the tensor's scale (the selections
of TIES, breadcrumbs, DARE and DELLA are exact, ties between equal bf16 magnitudes
included)."""

from __future__ import annotations

import pytest
import torch
from test_methods_fusion import ref_arcee_fusion
from test_methods_geometric import (
    close64,
    ref_karcher,
    ref_model_stock,
    ref_multislerp,
    ref_nearswap,
    ref_nuslerp,
)
from test_methods_ram import ref_ram
from test_methods_sparse import crumbs, dare, della_sp, sce_reference, top, tv_reference
from test_numeric import ref_ema, ref_lerp, ref_slerp, ref_warp

from algebra import Interpreter, Options

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def f64(subset):
    return {n: {k: v.double() for k, v in d.items()} for n, d in subset.items()}


def run(expr: str, subset) -> dict[str, torch.Tensor]:
    opts = Options(device="cpu", compute_dtype="float64", warn=lambda d: None, out=lambda s: None)
    res = Interpreter(options=opts).eval(expr, b=subset["base"], m1=subset["ft1"], m2=subset["ft2"])
    return res.state_dict(dtype="float64")


def test_the_fine_tunes_are_real_and_differ_where_trained(f64):
    """The fixture itself: ft1 changed layers 25 and 26, not 28; ft2 changed 26 and 28,
    not 25; neither changed the final norm; the task vectors are not parallel."""
    def changed(m, layer):
        return any(not torch.equal(f64[m][k], f64["base"][k]) for k in f64["base"] if f".{layer}." in k)

    assert changed("ft1", 25) and changed("ft1", 26) and not changed("ft1", 28)
    assert changed("ft2", 26) and changed("ft2", 28) and not changed("ft2", 25)
    assert torch.equal(f64["ft1"]["model.norm.weight"], f64["base"]["model.norm.weight"])
    k = "model.layers.26.self_attn.v_proj.weight"
    d1, d2 = (f64[m][k] - f64["base"][k] for m in ("ft1", "ft2"))
    assert abs(torch.nn.functional.cosine_similarity(d1.flatten(), d2.flatten(), dim=0)) < 0.9


def _ta(f64, w, scale=1.0):
    return tv_reference(f64, lambda n, i, d, s: d, w, scale=scale, models=("ft1", "ft2"))


CASES = {
    "lerp": ("lerp(m1, m2, 0.3)", lambda f: ref_lerp(f["ft1"], f["ft2"], 0.3)),
    "liti": ("liti(b, m1, 1.5)", lambda f: ref_lerp(f["base"], f["ft1"], 1.5)),
    "ema": ("ema([b, m1, m2], 0.1)", lambda f: ref_ema([f["base"], f["ft1"], f["ft2"]], 0.1)),
    "slerp": ("slerp(m1, m2, 0.4)", lambda f: ref_slerp(f["ft1"], f["ft2"], 0.4)[0]),
    "slerp_list_layer": ('slerp([m1, m2], base=b, per="layer")',
                         lambda f: ref_warp(f["base"], [f["ft1"], f["ft2"]], "layer")[0]),
    "slerp_list_tensor": ('slerp([m1, m2], base=b, per="tensor")',
                          lambda f: ref_warp(f["base"], [f["ft1"], f["ft2"]], "tensor")[0]),
    "linear": ("linear([m1, m2], [1, 2])",
               lambda f: {k: (f["ft1"][k] + 2 * f["ft2"][k]) / 3 for k in f["base"]}),
    "task_arithmetic": ("task_arithmetic(b, [m1, m2], [0.7, -0.4], scale=1.5)",
                        lambda f: _ta(f, [0.7, -0.4], 1.5)),
    "ties": ("ties(b, [m1, m2], [1, 0.8], 0.3, normalize=true)",
             lambda f: tv_reference(f, top(0.3), [1, 0.8], "sum", True, models=("ft1", "ft2"))),
    "dare_linear": ("dare_linear(b, [m1, m2], [1, 0.5], 0.4, seed=7)",
                    lambda f: tv_reference(f, dare(7, 0.4), [1, 0.5], models=("ft1", "ft2"))),
    "dare_ties": ("dare_ties(b, [m1, m2], 1, 0.6, seed=3, normalize=true)",
                  lambda f: tv_reference(f, dare(3, 0.6), [1, 1], "sum", True, models=("ft1", "ft2"))),
    "breadcrumbs": ("breadcrumbs(b, [m1, m2], [1, 0.5], 0.3, gamma=0.05)",
                    lambda f: tv_reference(f, crumbs(0.3, 0.05), [1, 0.5], models=("ft1", "ft2"))),
    "della": ("della(b, [m1, m2], [1, 0.8], 0.5, epsilon=0.2, seed=11)",
              lambda f: tv_reference(f, della_sp(11, 0.5, 0.2), [1, 0.8], "sum", True, models=("ft1", "ft2"))),
    "sce": ("sce(b, [m1, m2], 0.5)", lambda f: sce_reference(f, [f["ft1"], f["ft2"]], 0.5)),
    "model_stock": ("model_stock(b, [m1, m2])", lambda f: ref_model_stock(f["base"], [f["ft1"], f["ft2"]])),
    "nuslerp": ("nuslerp(m1, m2, 0.3, base=b)", lambda f: ref_nuslerp(f["ft1"], f["ft2"], 0.3, base=f["base"])),
    "nuslerp_rows": ("nuslerp(m1, m2, 0.7, base=b, flatten=false)",
                     lambda f: ref_nuslerp(f["ft1"], f["ft2"], 0.7, base=f["base"], flatten=False)),
    "multislerp": ("multislerp([m1, m2], [0.4, 0.6], base=b)",
                   lambda f: ref_multislerp([f["ft1"], f["ft2"]], [0.4, 0.6], base=f["base"])),
    "karcher": ("karcher([m1, m2], [1, 2], base=b)",
                lambda f: ref_karcher([f["ft1"], f["ft2"]], [1, 2], base=f["base"])),
    "nearswap": ("nearswap(b, m1, 0.0005)", lambda f: ref_nearswap(f["base"], f["ft1"], 0.0005)),
    # layer 25 is ft1's alone, 28 ft2's, 26 both's: RAM's unique and shared entries
    "ram": ("ram(b, [m1, m2])", lambda f: ref_ram(f["base"], [f["ft1"], f["ft2"]], 1e-5)),
    "ramplus_tl": ("ramplus_tl(b, [m1, m2], r=0.5, alpha=2)",
                   lambda f: ref_ram(f["base"], [f["ft1"], f["ft2"]], 1e-5, (0.5, 2.0))),
    "arcee_fusion": ("arcee_fusion(b, m1)", lambda f: ref_arcee_fusion(f["base"], f["ft1"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_matches_float64_reference(case, subset, f64):
    expr, ref = CASES[case]
    out = run(expr, subset)
    want = ref(f64)
    assert set(out) == set(want) == set(f64["base"])
    close64(out, want)
    # and the merge moved the trained layers: the result is not an input
    k = "model.layers.26.self_attn.v_proj.weight"
    assert not any(torch.equal(out[k], f64[m][k]) for m in ("base", "ft1", "ft2")) or case == "nearswap"
