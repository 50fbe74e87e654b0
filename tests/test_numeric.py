"""Every merge function checked numerically against an independent float64 reference.

The references below are written from the formulas of the language reference (plain
torch in float64 on tensors read with `safetensors.torch.load_file`); nothing here calls
algebra code to compute an expected value. Both paths are covered: in memory
(`Result.state_dict()`, dict and nn.Module bindings) and on disk (saved folders read back
with safetensors, their config.json, and the merged reward model run by transformers).

Tolerances, and why they are honest:

* float32 compute vs float64 reference: an elementwise linear combination computed in
  float32 is off by a few float32 ulps (2**-24 ~ 6e-8) *of its operands*, so the check is
  rtol=1e-5 plus an absolute term of 1e-6 times the tensor's largest magnitude (operands
  and result have the same scale here; a tiny output element made by cancellation may
  carry its operands' absolute error). Products, quotients and reciprocals are correctly
  rounded elementwise, so they are checked with a relative tolerance alone.
* float64 compute: ~1e-12 relative (only float64 rounding of float32 inputs remains).
* bf16 outputs: the float32 result is rounded once to bf16. Both it and the float64
  reference lie within a few float32 ulps of the exact value, so rounding each to bf16
  lands on the same bf16 number or on its neighbour: at most 1 bf16 ulp apart, measured
  exactly as a distance in representable numbers (not an rtol). Such 1-ulp disagreements
  need the exact value within a few float32 ulps of a bf16 rounding midpoint, so they
  must also be rare (< 1% of elements); truncation instead of rounding would show ~50%.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from algebra import AlgError, Interpreter, Options

# ---- reading ----------------------------------------------------------------------------


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder, via its index when there is one (and check the index:
    each tensor is in the shard the index names, and every shard tensor is indexed)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    out: dict[str, torch.Tensor] = {}
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for fname in sorted(set(weight_map.values())):
            shard = load_file(str(folder / fname))
            for name in shard:
                assert weight_map.get(name) == fname, f"{name} is in {fname} but indexed elsewhere"
            out.update(shard)
        assert set(out) == set(weight_map)
    else:
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
    assert out, f"no tensors in {folder}"
    return out


def f64(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.double() if v.is_floating_point() else v.clone()) for k, v in sd.items()}


def config_of(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def config_dtype(cfg: dict) -> str:
    return str(cfg.get("dtype") or cfg.get("torch_dtype"))


# ---- float64 references ------------------------------------------------------------------

THRESHOLD = 0.9995


def ref_lincomb(terms, const: float = 0.0) -> dict[str, torch.Tensor]:
    """sum of c * model, per tensor, in float64."""
    names = terms[0][1].keys()
    return {n: sum(c * m[n] for c, m in terms) + const for n in names}


def ref_lerp(a, b, t):
    return {n: (1 - t) * a[n] + t * b[n] for n in a}


def ref_merge(rm, lm, lam):
    """DogeRM: shared names merged (shared vocabulary rows only), rm-only names kept,
    lm-only names dropped."""
    out = {}
    for n, x in rm.items():
        if n not in lm:
            out[n] = x.clone()
            continue
        y = lm[n]
        if x.shape == y.shape:
            out[n] = (1 - lam) * x + lam * y
        else:
            rows = min(x.shape[0], y.shape[0])
            merged = x.clone()
            merged[:rows] = (1 - lam) * x[:rows] + lam * y[:rows]
            out[n] = merged
    return out


def ref_coeffs(xs, ys, t):
    """SLERP's coefficients (cx, cy) for one angle over the tensors xs/ys, and which
    branch the rule takes ("zero": a zero vector, "lerp": |cos| > 0.9995, "slerp")."""
    xy = sum(torch.dot(x.reshape(-1), y.reshape(-1)).item() for x, y in zip(xs, ys, strict=True))
    xx = sum(torch.dot(x.reshape(-1), x.reshape(-1)).item() for x in xs)
    yy = sum(torch.dot(y.reshape(-1), y.reshape(-1)).item() for y in ys)
    if xx == 0.0 or yy == 0.0:
        return 1 - t, t, "zero", None
    cos = xy / math.sqrt(xx * yy)
    if abs(cos) > THRESHOLD:
        return 1 - t, t, "lerp", cos
    omega = math.acos(cos)
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s, "slerp", cos


def ref_slerp(a, b, t):
    """Per-tensor SLERP of raw weights; returns (result, {name: branch})."""
    out, branches = {}, {}
    for n in a:
        cx, cy, branch, _ = ref_coeffs([a[n]], [b[n]], t)
        out[n] = cx * a[n] + cy * b[n]
        branches[n] = branch
    return out, branches


_LAYER = re.compile(r"layers\.(\d+)\.")


def ref_group(name: str, per: str) -> str:
    if per == "model":
        return "model"
    if per == "layer":
        m = _LAYER.search(name)
        if m:
            return f"layer {m.group(1)}"
    return f"tensor {name}"


def ref_warp(init, models, per):
    """WARP: task vectors d_i = m_i - init; s_1 = d_1, s_k = slerp(s_{k-1}, d_k, 1/k)
    with one angle per group; result init + s_M. Returns (result, [(k, group, branch)])."""
    names = [n for n in init if init[n].is_floating_point()]
    deltas = [{n: m[n] - init[n] for n in names} for m in models]
    groups: dict[str, list[str]] = defaultdict(list)
    for n in names:
        groups[ref_group(n, per)].append(n)
    s = deltas[0]
    log = []
    for k in range(2, len(models) + 1):
        d, t, new = deltas[k - 1], 1.0 / k, {}
        for g, members in groups.items():
            cx, cy, branch, _ = ref_coeffs([s[n] for n in members], [d[n] for n in members], t)
            log.append((k, g, branch))
            for n in members:
                new[n] = cx * s[n] + cy * d[n]
        s = new
    return {n: init[n] + s[n] for n in names}, log


def ref_ema(models, mu):
    theta = dict(models[0])
    for m in models[1:]:
        theta = {n: (1 - mu) * theta[n] + mu * m[n] for n in theta}
    return theta


# ---- comparisons -------------------------------------------------------------------------


def assert_close32(actual: dict, ref: dict, rtol: float = 1e-5, atol_rel: float = 1e-6,
                   names: bool = True) -> None:
    """float32 compute vs float64 reference (see the module docstring)."""
    if names:
        assert set(actual) == set(ref)
    for n, r in ref.items():
        a = actual[n]
        assert a.shape == r.shape, n
        scale = r.abs().max().item() if r.numel() else 0.0
        torch.testing.assert_close(a.double(), r, rtol=rtol, atol=atol_rel * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")


def assert_close64(actual: dict, ref: dict) -> None:
    assert set(actual) == set(ref)
    for n, r in ref.items():
        assert actual[n].dtype == torch.float64, n
        scale = r.abs().max().item() if r.numel() else 0.0
        torch.testing.assert_close(actual[n], r, rtol=1e-12, atol=1e-13 * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as integers ordered like the numbers they encode."""
    i = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def assert_bf16_within_one_ulp(actual: dict, ref: dict) -> None:
    assert set(actual) == set(ref)
    total = off = 0
    for n, r in ref.items():
        a = actual[n]
        assert a.dtype == torch.bfloat16, n
        dist = (_ordered(a) - _ordered(r.to(torch.bfloat16))).abs()
        assert int(dist.max()) <= 1, f"{n}: {int(dist.max())} bf16 ulps from the reference"
        total += dist.numel()
        off += int((dist > 0).sum())
    assert off < 0.01 * total, f"{off} of {total} elements are 1 ulp off: not rounded to nearest"


def assert_differs(actual: dict, other: dict, min_rel: float = 1e-3) -> None:
    """The result is not just one of its inputs (so the comparison above means something)."""
    num = sum((actual[n].double() - other[n].double()).norm().item() ** 2 for n in actual
              if actual[n].is_floating_point())
    den = sum(other[n].double().norm().item() ** 2 for n in actual if actual[n].is_floating_point())
    assert math.sqrt(num) > min_rel * math.sqrt(den)


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(family) -> Path:
    return Path(family["base"]).parent


@pytest.fixture(scope="module")
def fam64(family) -> dict[str, dict[str, torch.Tensor]]:
    """The float32 family read with safetensors, widened to float64."""
    return {name: f64(read_checkpoint(path)) for name, path in family.items()}


@pytest.fixture(scope="module")
def fam32(family) -> dict[str, dict[str, torch.Tensor]]:
    return {name: read_checkpoint(path) for name, path in family.items()}


@pytest.fixture(scope="module")
def interp(root) -> Interpreter:
    return Interpreter(device="cpu", base_dir=root)


def test_family_preconditions(fam64):
    """What the tests below rely on: rm has score.weight and no lm_head, the LMs the
    reverse; the models really differ."""
    assert "score.weight" in fam64["rm"] and "lm_head.weight" not in fam64["rm"]
    assert "lm_head.weight" in fam64["math"] and "score.weight" not in fam64["math"]
    for name in ("math", "rl1", "rl2", "rm"):
        shared = {n: fam64[name][n] for n in fam64["rm"] if n in fam64["base"]}
        assert_differs(shared, fam64["base"], min_rel=1e-3)


# ---- linear functions, in memory ---------------------------------------------------------


@pytest.mark.parametrize("t", [0.3, 1.5, -0.25])
def test_lerp(interp, fam64, t):
    res = interp.eval(f'lerp(load("math"), load("rl1"), {t})')
    sd = res.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert_close32(sd, ref_lerp(fam64["math"], fam64["rl1"], t))
    assert_differs(sd, fam64["math"], min_rel=1e-4)
    assert_differs(sd, fam64["rl1"], min_rel=1e-4)


@pytest.mark.parametrize("eta", [0.7, 2.0])
def test_liti(interp, fam64, eta):
    sd = interp.eval(f'liti(load("base"), load("rl2"), {eta})').state_dict()
    ref = {n: (1 - eta) * fam64["base"][n] + eta * fam64["rl2"][n] for n in fam64["base"]}
    assert_close32(sd, ref)
    assert_differs(sd, fam64["rl2"], min_rel=1e-4)


def test_ema_with_dict_bindings(fam32, fam64):
    """ema over in-memory state dicts, in order (a different order gives another result)."""
    mu = 0.1
    order = ["base", "math", "rl1", "rl2"]
    interp = Interpreter(device="cpu")
    res = interp.eval("ema([m0, m1, m2, m3], 0.1)",
                      **{f"m{i}": fam32[name] for i, name in enumerate(order)})
    sd = res.state_dict()
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in sd.values())
    ref = ref_ema([fam64[n] for n in order], mu)
    assert_close32(sd, ref)
    reversed_ref = ref_ema([fam64[n] for n in reversed(order)], mu)
    assert_differs(ref, reversed_ref, min_rel=1e-4)
    assert_differs(sd, fam64["base"], min_rel=1e-4)


def test_task_vector(interp, fam64):
    sd = interp.eval('task_vector(load("math"), load("base"))').state_dict()
    ref = {n: fam64["math"][n] - fam64["base"][n] for n in fam64["base"]}
    assert_close32(sd, ref)
    # the norm weights are not perturbed by the family builder: exactly zero
    assert torch.count_nonzero(sd["model.norm.weight"]) == 0
    assert_differs(sd, {n: torch.zeros_like(v) for n, v in ref.items()}, min_rel=0.5)


ARITH = [
    ("a - b", lambda a, b, base: ref_lincomb([(1.0, a), (-1.0, b)]), 1e-6),
    ("base + 0.5 * (a - base)", lambda a, b, base: ref_lincomb([(0.5, base), (0.5, a)]), 1e-6),
    ("a / 2", lambda a, b, base: ref_lincomb([(0.5, a)]), 1e-6),
    ("-a", lambda a, b, base: ref_lincomb([(-1.0, a)]), 1e-6),
    ("2 - a", lambda a, b, base: ref_lincomb([(-1.0, a)], 2.0), 1e-6),
    ("a + 1", lambda a, b, base: ref_lincomb([(1.0, a)], 1.0), 1e-6),
    ("3 * a - b / 4 + 0.5", lambda a, b, base: ref_lincomb([(3.0, a), (-0.25, b)], 0.5), 1e-6),
    ("a * b", lambda a, b, base: {n: a[n] * b[n] for n in a}, 0.0),
    ("a / b", lambda a, b, base: {n: a[n] / b[n] for n in a}, 0.0),
    ("1 / a", lambda a, b, base: {n: 1.0 / a[n] for n in a}, 0.0),
    # 2/(a*b) is at least ~200 here and a at most ~0.1: no cancellation, 3 roundings
    ("2 / (a * b) - a", lambda a, b, base: {n: 2.0 / (a[n] * b[n]) - a[n] for n in a}, 0.0),
]


@pytest.mark.parametrize("expr,ref_fn,atol_rel", ARITH, ids=[e for e, _, _ in ARITH])
def test_arithmetic(family, fam64, expr, ref_fn, atol_rel):
    a, b, base = fam64["math"], fam64["rl1"], fam64["base"]
    # a and b are perturbed everywhere: no zero to divide by (base has a zero padding row)
    assert all(bool((a[n] != 0).all() and (b[n] != 0).all()) for n in a)
    sd = Interpreter(device="cpu").eval(expr, a=family["math"], b=family["rl1"],
                                        base=family["base"]).state_dict()
    ref = ref_fn(a, b, base)
    # linear: rtol plus an absolute term at the tensor's scale; products and quotients are
    # correctly rounded elementwise, so a relative tolerance alone (a few float32 ulps)
    assert_close32(sd, ref, rtol=1e-5 if atol_rel else 1e-6, atol_rel=atol_rel)
    assert_differs(sd, a, min_rel=1e-3)


def test_division_by_a_zero_weight_is_reported(family):
    """base's embedding has an all-zero padding row: 1 / base is not finite there."""
    with pytest.raises(AlgError, match="not finite"):
        Interpreter(device="cpu").eval("1 / base", base=family["base"]).state_dict()


# ---- DogeRM merge ------------------------------------------------------------------------


def test_merge_shared_vocab(root, fam64):
    warnings = []
    interp = Interpreter(options=Options(device="cpu", warn=warnings.append), base_dir=root)
    lam = 0.35
    sd = interp.eval(f'merge(load("rm"), load("math"), {lam})').state_dict()
    rm, lm = fam64["rm"], fam64["math"]
    assert set(sd) == set(rm), "merge must keep exactly the reward model's tensor names"
    assert "lm_head.weight" not in sd
    assert torch.equal(sd["score.weight"].double(), rm["score.weight"]), "score head must be rm's"
    ref = ref_merge(rm, lm, lam)
    assert_close32(sd, ref)
    assert_differs({n: sd[n] for n in sd if n != "score.weight"}, rm, min_rel=1e-4)
    assert not warnings, [w.message for w in warnings]


def test_merge_vocab_mismatch(family_vocab):
    """rm has 8 more embedding rows: rows 0..V-1 are merged, the 8 extra come from rm
    unchanged, and a warning says so. A small chunk size makes the streamed chunks
    straddle the merged/kept boundary."""
    fam = {k: f64(read_checkpoint(v)) for k, v in family_vocab.items()}
    rm, lm = fam["rm"], fam["math"]
    emb = "model.embed_tokens.weight"
    v_rm, v_lm = rm[emb].shape[0], lm[emb].shape[0]
    assert v_rm == v_lm + 8
    warnings = []
    opts = Options(device="cpu", warn=warnings.append, chunk_elems=1000)
    interp = Interpreter(options=opts, base_dir=Path(family_vocab["rm"]).parent)
    lam = 0.6
    sd = interp.eval(f'merge(load("rm"), load("math"), {lam})').state_dict()
    assert set(sd) == set(rm)
    assert sd[emb].shape == rm[emb].shape
    ref = ref_merge(rm, lm, lam)
    assert_close32(sd, ref)
    assert torch.equal(sd[emb][v_lm:].double(), rm[emb][v_lm:]), "extra rows must be rm's, exactly"
    assert_differs({emb: sd[emb][:v_lm]}, {emb: rm[emb][:v_lm]}, min_rel=1e-3)
    msgs = [w.message for w in warnings]
    assert len(msgs) == 1 and emb in msgs[0], msgs
    assert f"0..{v_lm - 1}" in msgs[0]


@pytest.mark.parametrize("rm_rows,lm_rows", [(7, 5), (5, 7)])
def test_merge_vocab_mismatch_dict_bindings(rm_rows, lm_rows):
    """Without configs the embedding is recognised by its name; either side may be the
    larger. The output always has rm's shapes."""
    g = torch.Generator().manual_seed(3)
    emb = "model.embed_tokens.weight"
    layer = "model.layers.0.w"
    rm = {emb: torch.randn(rm_rows, 3, generator=g), layer: torch.randn(2, 2, generator=g),
          "score.weight": torch.randn(1, 3, generator=g)}
    lm = {emb: torch.randn(lm_rows, 3, generator=g), layer: torch.randn(2, 2, generator=g),
          "lm_head.weight": torch.randn(lm_rows, 3, generator=g)}
    warnings = []
    interp = Interpreter(options=Options(device="cpu", warn=warnings.append))
    sd = interp.eval("merge(rm, lm, 0.25)", rm=rm, lm=lm).state_dict()
    assert set(sd) == set(rm) and sd[emb].shape == rm[emb].shape
    assert_close32(sd, ref_merge(f64(rm), f64(lm), 0.25))
    assert len(warnings) == 1 and emb in warnings[0].message


def test_merge_module_bindings(family, fam64):
    """nn.Module bindings: results on the bindings' device, same numbers."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(family["rm"])
    lm = AutoModelForCausalLM.from_pretrained(family["rl2"])
    sd = Interpreter(device="cpu").eval("merge(rm, lm, 0.5)", rm=rm, lm=lm).state_dict()
    assert set(sd) == set(rm.state_dict())
    assert all(v.device.type == "cpu" for v in sd.values())
    assert_close32(sd, ref_merge(fam64["rm"], fam64["rl2"], 0.5))


# ---- SLERP of raw weights ----------------------------------------------------------------


def test_slerp_raw_fallback_branch_on_family(interp, fam64):
    """Fine-tunes 2% apart have |cos| > 0.9995 on every tensor: SLERP falls back to lerp."""
    t = 0.3
    sd = interp.eval(f'slerp(load("math"), load("rl1"), {t})').state_dict()
    ref, branches = ref_slerp(fam64["math"], fam64["rl1"], t)
    assert set(branches.values()) == {"lerp"}, branches
    assert_close32(sd, ref)
    assert_close32(sd, ref_lerp(fam64["math"], fam64["rl1"], t))


def test_slerp_raw_spherical_branch(fam32, fam64):
    """b = base + 30 * (rl1 - base) is far enough from math for a real angle (the norm
    weights, all ones in both, still fall back); also a zero tensor (falls back) and a
    tensor with a negative cosine."""
    a32 = dict(fam32["math"])
    b32 = {n: (fam32["base"][n] + 30 * (fam32["rl1"][n] - fam32["base"][n])) for n in a32}
    a32["extra.zero"] = torch.zeros(5, 3)
    b32["extra.zero"] = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, generator=g)
    a32["extra.obtuse"], b32["extra.obtuse"] = x, -x + 0.5 * torch.randn(40, generator=g)
    t = 0.3
    sd = Interpreter(device="cpu").eval(f"slerp(a, b, {t})", a=a32, b=b32).state_dict()
    ref, branches = ref_slerp(f64(a32), f64(b32), t)
    assert branches["model.norm.weight"] == "lerp"
    assert branches["extra.zero"] == "zero"
    assert branches["model.layers.0.self_attn.q_proj.weight"] == "slerp"
    assert branches["extra.obtuse"] == "slerp"
    assert sum(b == "slerp" for b in branches.values()) > len(branches) // 2
    assert_close32(sd, ref)
    # the spherical result really differs from lerp (where the rule chose slerp)
    lin = ref_lerp(f64(a32), f64(b32), t)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (lin[q] - ref[q]).norm() > 1e-3 * ref[q].norm()


def test_slerp_raw_antiparallel_falls_back(interp, fam64):
    """cos(a, -a) = -1: |cos| > 0.9995, so lerp: 0.75 a - 0.25 a = a / 2."""
    sd = interp.eval('slerp(load("math"), -load("math"), 0.25)').state_dict()
    assert_close32(sd, {n: 0.5 * v for n, v in fam64["math"].items()})


# ---- WARP: SLERP of task vectors ---------------------------------------------------------

WARP_MODELS = {2: ["rl1", "rl2"], 3: ["rl1", "rl2", "math"]}


@pytest.mark.parametrize("per", ["tensor", "layer", "model"])
@pytest.mark.parametrize("m", [2, 3])
def test_warp(interp, fam64, per, m):
    names = WARP_MODELS[m]
    loads = ", ".join(f'load("{n}")' for n in names)
    sd = interp.eval(f'slerp([{loads}], base=load("base"), per="{per}")').state_dict()
    ref, log = ref_warp(fam64["base"], [fam64[n] for n in names], per)
    branches = {b for _, _, b in log}
    if per == "model":
        assert branches == {"slerp"}, log
    else:
        # the norm weights are never perturbed: the final norm's task vectors are zero and,
        # as a group of its own, take the zero-vector fallback
        assert branches == {"zero", "slerp"}, log
    assert_close32(sd, ref)
    # the spherical coefficients matter: not the plain average of the models
    plain = ref_lincomb([(1.0 / m, fam64[n]) for n in names])
    assert_differs(sd, plain, min_rel=1e-5)


def test_warp_grouping_is_exercised(interp, fam64):
    """per="layer" (the default), "model" and "tensor" give different results, each
    matching its own reference; the default is per="layer"."""
    base, ms = fam64["base"], [fam64["rl1"], fam64["rl2"], fam64["math"]]
    out, refs = {}, {}
    for per in ("layer", "model", "tensor"):
        out[per] = interp.eval(
            f'slerp([load("rl1"), load("rl2"), load("math")], base=load("base"), per="{per}")'
        ).state_dict()
        refs[per] = ref_warp(base, ms, per)[0]
        assert_close32(out[per], refs[per])
    default = interp.eval('slerp([load("rl1"), load("rl2"), load("math")], base=load("base"))')
    default = default.state_dict()
    for n in default:
        assert torch.equal(default[n], out["layer"][n]), n
    # the references differ from one another by far more than the tolerance...
    q = "model.layers.0.self_attn.q_proj.weight"
    for p1, p2 in (("layer", "model"), ("layer", "tensor"), ("model", "tensor")):
        d_ref = (refs[p1][q] - refs[p2][q]).abs().max().item()
        assert d_ref > 1e-3 * (refs[p1][q] - base[q]).abs().max().item(), (p1, p2)
        # ...and so do the computed results
        d_out = (out[p1][q].double() - out[p2][q].double()).abs().max().item()
        assert d_out > 0.5 * d_ref, (p1, p2)


def test_warp_parallel_task_vectors_fall_back_to_lerp(fam32, fam64):
    """m2 - init = 2 (m1 - init): cos = 1 > 0.9995, so s = 0.5 d1 + 0.5 (2 d1)."""
    init, m1 = fam32["base"], fam32["math"]
    m2 = {n: init[n] + 2 * (m1[n] - init[n]) for n in init}
    sd = Interpreter(device="cpu").eval('slerp([m1, m2], base=init, per="model")',
                                        init=init, m1=m1, m2=m2).state_dict()
    ref, log = ref_warp(f64(init), [f64(m1), f64(m2)], "model")
    assert [b for _, _, b in log] == ["lerp"]
    assert_close32(sd, ref)
    expected = {n: fam64["base"][n] + 1.5 * (fam64["math"][n] - fam64["base"][n]) for n in init}
    assert_close32(sd, expected, rtol=1e-4)


def test_warp_streamed_in_small_chunks(root, fam64):
    """Reductions and writes streamed in chunks of 1000 elements (every weight matrix
    spans several chunks) give the reference result."""
    interp = Interpreter(options=Options(device="cpu", chunk_elems=1000), base_dir=root)
    sd = interp.eval('slerp([load("rl1"), load("rl2"), load("math")], base=load("base"))')
    ref, _ = ref_warp(fam64["base"], [fam64["rl1"], fam64["rl2"], fam64["math"]], "layer")
    assert_close32(sd.state_dict(), ref)


def _small(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.layers.0.a": torch.randn(4, 3, generator=g),
            "model.layers.0.b": torch.randn(5, generator=g),
            "model.layers.1.a": torch.randn(4, 3, generator=g),
            "model.embed.weight": torch.randn(6, 2, generator=g)}


def test_compositions_and_shared_subexpressions(tmp_path):
    """WARP with M = 4, SLERP of a SLERP (a reduction over a value that needs another
    reduction), a lerp of two SLERPs, and one recipe whose saves share a subexpression."""
    init, m0, m1, m2, m3 = (_small(i) for i in range(5))
    i64, d0, d1, d2, d3 = (f64(x) for x in (init, m0, m1, m2, m3))
    binds = {"init": init, "m0": m0, "m1": m1, "m2": m2, "m3": m3}
    interp = Interpreter(device="cpu")
    for per in ("tensor", "layer", "model"):
        sd = interp.eval(f'slerp([m0, m1, m2, m3], base=init, per="{per}")', **binds)
        ref, log = ref_warp(i64, [d0, d1, d2, d3], per)
        assert [k for k, _, _ in log].count(4) == len({g for _, g, _ in log})
        assert_close32(sd.state_dict(), ref)
    sd = interp.eval("slerp(slerp(m0, m1, 0.3), m2, 0.6)", **binds).state_dict()
    assert_close32(sd, ref_slerp(ref_slerp(d0, d1, 0.3)[0], d2, 0.6)[0])
    sd = interp.eval("lerp(slerp([m0, m1], base=init), slerp(m2, m3, 0.3), 0.4)", **binds)
    warp = ref_warp(i64, [d0, d1], "layer")[0]
    assert_close32(sd.state_dict(), ref_lerp(warp, ref_slerp(d2, d3, 0.3)[0], 0.4))
    # a recipe with three saves: the WARP value is shared by two of them
    recipe = (f'w = slerp([m0, m1, m2], base=init)\n'
              f'save(w, "{tmp_path}/w")\n'
              f'save(slerp([m0, m1, m2], base=init, per="model"), "{tmp_path}/wm")\n'
              f'save(lerp(w, m3, 0.5), "{tmp_path}/mix")')
    interp.eval(recipe, **binds)
    warp = ref_warp(i64, [d0, d1, d2], "layer")[0]
    assert_close32(read_checkpoint(tmp_path / "w"), warp)
    assert_close32(read_checkpoint(tmp_path / "wm"), ref_warp(i64, [d0, d1, d2], "model")[0])
    assert_close32(read_checkpoint(tmp_path / "mix"), ref_lerp(warp, d3, 0.5))


def test_noncontiguous_and_grad_bindings():
    """Transposed / strided tensors and tensors that require grad bind as their values."""
    g = torch.Generator().manual_seed(4)
    a = {"w": torch.randn(3, 4, generator=g).t(), "v": torch.randn(5, generator=g)[::2]}
    b = {"w": torch.randn(4, 3, generator=g), "v": torch.randn(3, generator=g).requires_grad_()}
    sd = Interpreter(device="cpu").eval("slerp(a, b, 0.3)", a=a, b=b).state_dict()
    ref, branches = ref_slerp(f64({k: v.detach() for k, v in a.items()}),
                              f64({k: v.detach() for k, v in b.items()}), 0.3)
    assert set(branches.values()) == {"slerp"}
    assert_close32(sd, ref)


# ---- float64 compute ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def interp64(root) -> Interpreter:
    return Interpreter(options=Options(device="cpu", compute_dtype="float64"), base_dir=root)


def test_float64_compute_linear(interp64, fam64):
    f = fam64
    cases = [
        ('lerp(load("math"), load("rl1"), 0.3)', ref_lerp(f["math"], f["rl1"], 0.3)),
        ('liti(load("base"), load("rl2"), 1.7)',
         {n: -0.7 * f["base"][n] + 1.7 * f["rl2"][n] for n in f["base"]}),
        ('ema([load("base"), load("math"), load("rl1")], 0.2)',
         ref_ema([f["base"], f["math"], f["rl1"]], 0.2)),
        ('task_vector(load("rl1"), load("base"))',
         {n: f["rl1"][n] - f["base"][n] for n in f["base"]}),
        ('merge(load("rm"), load("math"), 0.4)', ref_merge(f["rm"], f["math"], 0.4)),
        ('2 - load("math") / 3', ref_lincomb([(-1.0 / 3.0, f["math"])], 2.0)),
    ]
    for src, ref in cases:
        res = interp64.eval(src)
        default = res.state_dict()
        # compute in float64, output in the primary input's dtype unless asked
        assert all(v.dtype == torch.float32 for v in default.values()), src
        assert_close64(res.state_dict(dtype="float64"), ref)


def test_float64_compute_slerp(interp64, fam32, fam64):
    sd = interp64.eval(
        'slerp([load("rl1"), load("rl2"), load("math")], base=load("base"), per="model")'
    ).state_dict(dtype="float64")
    ref, _ = ref_warp(fam64["base"], [fam64["rl1"], fam64["rl2"], fam64["math"]], "model")
    assert_close64(sd, ref)
    a32 = fam32["math"]
    b32 = {n: fam32["base"][n] + 30 * (fam32["rl1"][n] - fam32["base"][n]) for n in a32}
    interp = Interpreter(options=Options(device="cpu", compute_dtype="float64"))
    sd = interp.eval("slerp(a, b, 0.7)", a=a32, b=b32).state_dict(dtype="float64")
    ref, branches = ref_slerp(f64(a32), f64(b32), 0.7)
    assert "slerp" in branches.values()
    assert_close64(sd, ref)


def test_float64_compute_nonlinear(interp64, fam64):
    a, b = fam64["math"], fam64["rl1"]
    sd = interp64.eval('load("math") / load("rl1") + 1 / load("math") * load("rl1")')
    sd = sd.state_dict(dtype="float64")
    for n in a:
        torch.testing.assert_close(sd[n], a[n] / b[n] + (1 / a[n]) * b[n], rtol=1e-12, atol=0)


# ---- bf16 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf(family_bf16):
    return {name: f64(read_checkpoint(p)) for name, p in family_bf16.items()}


def test_bf16_family_is_bf16(family_bf16):
    sd = read_checkpoint(family_bf16["base"])
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert config_dtype(config_of(family_bf16["base"])) == "bfloat16"


def test_bf16_lerp_within_one_ulp(family_bf16, bf):
    interp = Interpreter(device="cpu", base_dir=Path(family_bf16["base"]).parent)
    sd = interp.eval('lerp(load("math"), load("rl1"), 0.3)').state_dict()
    assert_bf16_within_one_ulp(sd, ref_lerp(bf["math"], bf["rl1"], 0.3))
    sd = interp.eval('merge(load("rm"), load("rl2"), 0.45)').state_dict()
    assert_bf16_within_one_ulp(sd, ref_merge(bf["rm"], bf["rl2"], 0.45))


def test_bf16_warp_within_one_ulp(family_bf16, bf):
    interp = Interpreter(device="cpu", base_dir=Path(family_bf16["base"]).parent)
    sd = interp.eval('slerp([load("rl1"), load("rl2"), load("math")], base=load("base"))')
    ref, log = ref_warp(bf["base"], [bf["rl1"], bf["rl2"], bf["math"]], "layer")
    assert {b for _, _, b in log} == {"slerp", "zero"}  # the final norm: zero task vectors
    assert len({g for _, g, _ in log}) == 3 + 3  # 3 layers + embed, final norm, lm_head
    assert_bf16_within_one_ulp(sd.state_dict(), ref)


def test_bf16_inputs_saved_as_float32(family_bf16, bf, tmp_path):
    interp = Interpreter(device="cpu", base_dir=Path(family_bf16["base"]).parent)
    out = tmp_path / "lerp32"
    interp.eval(f'save(lerp(load("math"), load("rl1"), 0.3), "{out}", dtype="float32")')
    sd = read_checkpoint(out)
    assert {v.dtype for v in sd.values()} == {torch.float32}
    assert config_dtype(config_of(out)) == "float32"
    # bf16 inputs are exact in float32: only the float32 compute's rounding remains
    assert_close32(sd, ref_lerp(bf["math"], bf["rl1"], 0.3), rtol=1e-6, atol_rel=1e-7)


# ---- on disk -----------------------------------------------------------------------------


def test_saved_float32_as_bf16(interp, fam64, tmp_path):
    out = tmp_path / "merged-bf16"
    interp.eval(f'save(merge(load("rm"), load("math"), 0.4), "{out}", dtype="bf16")')
    sd = read_checkpoint(out)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert config_dtype(config_of(out)) == "bfloat16"
    assert_bf16_within_one_ulp(sd, ref_merge(fam64["rm"], fam64["math"], 0.4))


def _logits(model, ids):
    mask = (ids != 0).long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.double()


def test_saved_reward_model_runs_in_transformers(interp, family, fam64, tmp_path):
    """The merged reward model saved by alg loads as a sequence classifier, with rm's
    config and tokenizer, and scores a batch exactly as the reference weights do."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    out = tmp_path / "doge"
    lam = 0.3
    interp.eval(f'save(merge(load("rm"), load("math"), {lam}), "{out}")')
    sd = read_checkpoint(out)
    ref = ref_merge(fam64["rm"], fam64["math"], lam)
    assert set(sd) == set(fam64["rm"])
    assert_close32(sd, ref)
    cfg = config_of(out)
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert len(cfg["id2label"]) == 1
    assert config_dtype(cfg) == "float32"
    assert (out / "tokenizer.json").is_file()

    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    problems = ("missing_keys", "unexpected_keys", "mismatched_keys")
    assert not any(info.get(k) for k in problems), info
    model.eval()
    reference = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(out))
    reference.load_state_dict({n: v.float() for n, v in ref.items()}, strict=True)
    reference.eval()
    original = AutoModelForSequenceClassification.from_pretrained(family["rm"]).eval()

    ids = torch.tensor([[1, 17, 45, 99, 203, 2], [1, 5, 6, 7, 2, 0], [1, 250, 2, 0, 0, 0]])
    got, want, before = _logits(model, ids), _logits(reference, ids), _logits(original, ids)
    assert got.shape == (3, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - before).abs().max() > 1e-4, "the merge changed nothing the model computes"


def test_saved_module_binding_merge_runs_in_transformers(family, fam64, tmp_path):
    """Saving a merge of nn.Module bindings (config taken from the module)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(family["rm"])
    lm = AutoModelForCausalLM.from_pretrained(family["math"])
    out = tmp_path / "doge-mod"
    Interpreter(device="cpu").eval(f'save(merge(rm, lm, 0.25), "{out}")', rm=rm, lm=lm)
    sd = read_checkpoint(out)
    assert_close32(sd, ref_merge(fam64["rm"], fam64["math"], 0.25))
    assert config_dtype(config_of(out)) == "float32"
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.tensor([[1, 30, 40, 2]])
    assert torch.isfinite(_logits(model, ids)).all()


def test_saved_float64_output(interp64, fam64, tmp_path):
    out = tmp_path / "ema64"
    models = '[load("base"), load("rl1"), load("rl2")]'
    interp64.eval(f'save(ema({models}, 0.3), "{out}", dtype="fp64")')
    sd = read_checkpoint(out)
    assert config_dtype(config_of(out)) == "float64"
    assert_close64(sd, ref_ema([fam64["base"], fam64["rl1"], fam64["rl2"]], 0.3))


def test_saved_sharded_warp(interp, fam64, tmp_path):
    """A sharded save (several files and an index) read back with safetensors."""
    res = interp.eval('slerp([load("rl1"), load("rl2")], base=load("base"), per="model")')
    out = res.save(tmp_path / "warp", shard_size="100KB")
    shards = sorted(p.name for p in Path(out).glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    sd = read_checkpoint(out)
    ref, _ = ref_warp(fam64["base"], [fam64["rl1"], fam64["rl2"]], "model")
    assert_close32(sd, ref)
    in_memory = res.state_dict()
    for n in sd:
        assert torch.equal(sd[n], in_memory[n]), n
    assert config_dtype(config_of(out)) == "float32"


# ---- integer tensors ---------------------------------------------------------------------


def _with_ints(seed: int, ints: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.w": torch.randn(6, 4, generator=g),
        "model.layers.1.w": torch.randn(6, 4, generator=g),
        "model.position_ids": ints,
        "model.mask": torch.rand(5, generator=g) > 0.5,
    }


@pytest.mark.parametrize("src", [
    "lerp(a, b, 0.3)",
    "merge(a, b, 0.3)",
    "slerp(a, b, 0.3)",
    "a - b",
    "2 * a / b",
    # WARP: whether its primary is m1 or base is not pinned down here (c has a's ints)
    "slerp([a, b], base=c, per=\"model\")",
])
def test_integer_tensors_copied_from_primary(src):
    a = _with_ints(0, torch.arange(10, dtype=torch.int64))
    b = _with_ints(1, torch.arange(10, 20, dtype=torch.int64))
    c = _with_ints(2, torch.arange(10, dtype=torch.int64))
    c["model.mask"] = a["model.mask"].clone()
    sd = Interpreter(device="cpu").eval(src, a=a, b=b, c=c).state_dict()
    for n in ("model.position_ids", "model.mask"):
        assert sd[n].dtype == a[n].dtype, n
        assert torch.equal(sd[n], a[n]), n
    assert sd["model.layers.0.w"].dtype == torch.float32


@pytest.mark.parametrize("compute,value", [("float32", 2**24 + 1), ("float64", 2**53 + 1)])
def test_large_integer_tensors_copied_exactly(compute, value):
    """A copy is a copy: int64 values are not rounded through the compute dtype
    (e.g. a step counter or hashed ids above 2**24)."""
    ints = torch.tensor([value, 3, -value], dtype=torch.int64)
    a = _with_ints(0, ints)
    b = _with_ints(1, torch.zeros(3, dtype=torch.int64))
    interp = Interpreter(options=Options(device="cpu", compute_dtype=compute))
    sd = interp.eval("lerp(a, b, 0.5)", a=a, b=b).state_dict()
    assert sd["model.position_ids"].tolist() == ints.tolist()
