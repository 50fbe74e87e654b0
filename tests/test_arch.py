"""Any architecture: merges, ramps and frankenmerges of tiny checkpoints of thirteen
architectures that transformers ships, each saved by alg, reloaded by transformers and
run forward, and each tensor checked against an independent float64 reference.

The references restate the documented rules per architecture by hand (the layer prefix
of each, which tensors are input-side) rather than calling `algebra.arch`, and
`test_description_matches_transformers` checks `algebra.arch` against transformers' own
idea of the input embedding and output head, built on the meta device.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from algebra import AlgError, Interpreter, Options
from algebra.arch import describe
from algebra.io.checkpoint import open_checkpoint
from algebra.tiny import ARCHS, TINY_VOCAB, arch_config, build_arch_family

ALL = sorted(ARCHS)
LAYER_PREFIX = {"gpt2": "transformer.h.", "falcon": "transformer.h.", "bert": "bert.encoder.layer.",
                "gpt_neox": "gpt_neox.layers."}
INPUT_SIDE = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
              "token_type_embeddings", "embeddings.LayerNorm", "embed_in")
TIED = {"qwen2", "gemma", "gemma2", "gemma3", "gpt2", "falcon", "bert"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("archs")
    for arch in ALL:
        build_arch_family(r / arch, arch)
    build_arch_family(r / "llama_tied", "llama", tie=True)  # a, b: tied fine-tunes of an untied base
    build_arch_family(r / "llama48", "llama", hidden=48, names=("base",))
    return r


@pytest.fixture
def warnings() -> list:
    return []


@pytest.fixture
def interp(root, warnings) -> Interpreter:
    return Interpreter(options=Options(device="cpu", warn=warnings.append), base_dir=root)


def read64(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update({k: v.double() if v.is_floating_point() else v for k, v in load_file(f).items()})
    return out


def config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def layer_index(arch: str, name: str) -> int | None:
    prefix = LAYER_PREFIX.get(arch, "model.layers.")
    m = re.match(re.escape(prefix) + r"(\d+)\.", name)
    return int(m.group(1)) if m else None


def depth(arch: str, name: str, n_layers: int) -> float:
    i = layer_index(arch, name)
    if i is not None:
        return i / (n_layers - 1)
    return 0.0 if any(s in name for s in INPUT_SIDE) and "embed_out" not in name else 1.0


def assert_matches(actual: dict, ref: dict, dtype=torch.float32) -> None:
    assert set(actual) == set(ref)
    for n, r in ref.items():
        a = actual[n]
        assert a.shape == r.shape, n
        if not r.is_floating_point():
            assert torch.equal(a, r), n
            continue
        scale = r.abs().max().item() if r.numel() else 0.0
        torch.testing.assert_close(a, r.to(dtype).double(), rtol=1e-5, atol=1e-6 * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")


def reload_and_run(folder: Path) -> torch.nn.Module:
    """transformers loads the folder as it is, and a forward pass gives finite logits."""
    cfg = config(folder)
    cls = getattr(transformers, cfg["architectures"][0])
    model = cls.from_pretrained(folder).eval()
    ids = torch.tensor([[3, 17, 42, 5, 88, 9, 61, 30]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 8, TINY_VOCAB)
    assert torch.isfinite(logits).all()
    return model


def assert_tied(model: torch.nn.Module, saved: dict, cfg: dict) -> None:
    """A tied output stays tied: the flag is kept, no head tensor is written, and the
    reloaded head is the (saved) input embedding."""
    assert cfg.get("tie_word_embeddings", True) is True
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(inp, out)
    names = [n for n, t in saved.items() if t.shape == tuple(inp.shape)]
    assert len(names) == 1, f"a spurious head tensor was written: {names}"
    assert torch.equal(saved[names[0]].float(), inp.detach())


# ---- the description, against transformers ----------------------------------------------


@pytest.mark.parametrize("arch", ALL)
def test_description_matches_transformers(root, arch):
    src = open_checkpoint(root / arch / "a")
    a = describe(src.tensors, src.config)
    cfg = arch_config(arch)
    with torch.device("meta"):
        model = getattr(transformers, ARCHS[arch][1])(cfg)
    by_id = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    inp = by_id[id(model.get_input_embeddings().weight)]
    out = by_id[id(model.get_output_embeddings().weight)]
    assert a.embedding in inp
    assert a.tied == (arch in TIED) == (inp == out)
    if a.tied:
        assert not any(n in src.tensors for n in out if n != a.embedding)
    else:
        # transformers 5 calls GPT-NeoX's head lm_head in memory but stores it as embed_out
        stored = {"lm_head.weight": "embed_out.weight"} if arch == "gpt_neox" else {}
        assert a.head in [stored.get(n, n) for n in out]
    assert a.n_layers == 3 and a.layer_prefix == LAYER_PREFIX.get(arch, "model.layers.")
    assert {layer_index(arch, n) for n in a.layer_of} == {0, 1, 2}
    assert all(layer_index(arch, n) is None for n in src.tensors if n not in a.layer_of)


# ---- merges on every architecture ----------------------------------------------------------


@pytest.mark.parametrize("arch", ALL)
def test_task_arithmetic(root, interp, arch, tmp_path):
    out = tmp_path / "ta"
    interp.eval(f'base = load("{arch}/base"); a = load("{arch}/a"); b = load("{arch}/b")\n'
                f'save(base + 0.5 * (a - base) + 0.5 * (b - base), "{out}")')
    base, a, b = (read64(root / arch / n) for n in ("base", "a", "b"))
    ref = {n: base[n] + 0.5 * (a[n] - base[n]) + 0.5 * (b[n] - base[n]) if base[n].is_floating_point()
           else base[n] for n in base}
    saved = read64(out)
    assert_matches(saved, ref)
    assert config(out)["architectures"] == config(root / arch / "base")["architectures"]
    model = reload_and_run(out)
    if arch in TIED:
        assert_tied(model, saved, config(out))


@pytest.mark.parametrize("arch", ALL)
def test_ramp_weighted_lerp(root, interp, arch, tmp_path):
    """t = ramp(0.2, 0.9, 0.4): layer i of 3 gets 0.2, 0.9, 0.4; input-side tensors 0.2;
    the final norm and head 0.4."""
    out = tmp_path / "ramp"
    interp.eval(f'save(lerp(load("{arch}/a"), load("{arch}/b"), ramp(0.2, 0.9, 0.4)), "{out}")')
    a, b = read64(root / arch / "a"), read64(root / arch / "b")
    ts = {}
    for n in a:
        ts[n] = float(np.interp(depth(arch, n, 3), [0, 0.5, 1], [0.2, 0.9, 0.4]))
    assert {ts[n] for n in a if layer_index(arch, n) is not None} == {0.2, 0.9, 0.4}
    ref = {n: (1 - ts[n]) * a[n] + ts[n] * b[n] if a[n].is_floating_point() else a[n] for n in a}
    saved = read64(out)
    assert_matches(saved, ref)
    if arch in TIED:  # (every architecture is reloaded by test_task_arithmetic)
        assert_tied(reload_and_run(out), saved, config(out))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "gemma2", "gpt_neox", "phi3"])
def test_frankenmerge(root, interp, arch, tmp_path):
    """stack(layers(a, 0, 2), layers(b, 1, 3)): a's layers 0, 1 then b's 1, 2 as layers
    0..3; embeddings from a, the tensors after the layers from b; the config counts 4
    layers and its per-layer lists follow."""
    out = tmp_path / "stack"
    interp.eval(f'a = load("{arch}/a"); b = load("{arch}/b")\n'
                f'save(stack(layers(a, 0, 2), layers(b, 1, 3)), "{out}")')
    a, b = read64(root / arch / "a"), read64(root / arch / "b")
    prefix = LAYER_PREFIX.get(arch, "model.layers.")
    ref = {}
    for n in a:
        i = layer_index(arch, n)
        rest = n[len(prefix) + len(str(i)) + 1:] if i is not None else None
        if i is None:
            ref[n] = a[n] if depth(arch, n, 3) == 0.0 else b[n]
        elif i < 2:
            ref[n] = a[n]
            ref[f"{prefix}{i + 2}.{rest}"] = b[f"{prefix}{i + 1}.{rest}"]
    saved = read64(out)
    assert_matches(saved, ref)
    cfg, cfg_a, cfg_b = config(out), config(root / arch / "a"), config(root / arch / "b")
    key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    assert cfg[key] == 4
    if "layer_types" in cfg_a:
        assert cfg["layer_types"] == cfg_a["layer_types"][0:2] + cfg_b["layer_types"][1:3]
    model = reload_and_run(out)
    assert model.config.num_hidden_layers == 4
    if arch in TIED:
        assert_tied(model, saved, cfg)


def test_layers_alone_prunes_and_counts_from_the_end(root, interp, tmp_path):
    out = tmp_path / "pruned"
    interp.eval(f'save(layers(load("gemma2/a"), -2), "{out}")')
    a = read64(root / "gemma2" / "a")
    saved = read64(out)
    for n, t in saved.items():
        i = layer_index("gemma2", n)
        src = n if i is None else n.replace(f"model.layers.{i}.", f"model.layers.{i + 1}.", 1)
        assert torch.equal(t, a[src].float()), n
    cfg = config(out)
    assert cfg["num_hidden_layers"] == 2
    assert cfg["layer_types"] == config(root / "gemma2" / "a")["layer_types"][1:]
    reload_and_run(out)


# ---- per-layer SLERP on names other than layers.N ----------------------------------------


def ref_slerp_coeffs(xs, ys, t):
    xy = sum(float(torch.dot(x.reshape(-1), y.reshape(-1))) for x, y in zip(xs, ys, strict=True))
    xx = sum(float(torch.dot(x.reshape(-1), x.reshape(-1))) for x in xs)
    yy = sum(float(torch.dot(y.reshape(-1), y.reshape(-1))) for y in ys)
    cos = xy / math.sqrt(xx * yy)
    assert abs(cos) < 0.9995  # the spherical branch, not the linear fallback
    w = math.acos(cos)
    return math.sin((1 - t) * w) / math.sin(w), math.sin(t * w) / math.sin(w)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_per_layer_slerp_with_a_ramp(root, interp, arch, tmp_path):
    """One angle per layer (transformer.h.N / encoder.layer.N), t from a ramp; every
    tensor outside the layers alone."""
    out = tmp_path / "slerp"
    # a and b are near-parallel (fine-tunes of one base): use their task vectors' directions
    interp.eval(f'base = load("{arch}/base")\n'
                f'save(slerp(load("{arch}/a") - base, load("{arch}/b") - base, ramp(0.25, 0.75), per="layer"), "{out}")')
    base, a, b = (read64(root / arch / n) for n in ("base", "a", "b"))
    x = {n: a[n] - base[n] for n in a if a[n].is_floating_point()}
    y = {n: b[n] - base[n] for n in b if b[n].is_floating_point()}
    groups: dict = {}
    for n in x:
        i = layer_index(arch, n)
        groups.setdefault(("layer", i) if i is not None else ("tensor", n), []).append(n)
    assert len([g for g in groups if g[0] == "layer"]) == 3
    ref = {}
    for members in groups.values():
        for n in members:
            t = float(np.interp(depth(arch, n, 3), [0, 1], [0.25, 0.75]))
            cx, cy = ref_slerp_coeffs([x[m] for m in members], [y[m] for m in members], t)
            ref[n] = cx * x[n] + cy * y[n]
    saved = read64(out)
    assert_matches({n: saved[n] for n in ref}, ref)


# ---- tied and untied heads -------------------------------------------------------------------


def test_untied_with_tied_uses_the_embedding_as_head(root, interp, warnings, tmp_path):
    out = tmp_path / "mixed"
    interp.eval(f'save(lerp(load("llama_tied/base"), load("llama_tied/a"), 0.5), "{out}")')
    base, a = read64(root / "llama_tied" / "base"), read64(root / "llama_tied" / "a")
    assert "lm_head.weight" in base and "lm_head.weight" not in a
    ref = {n: 0.5 * base[n] + 0.5 * a[n] for n in a}
    ref["lm_head.weight"] = 0.5 * base["lm_head.weight"] + 0.5 * a["model.embed_tokens.weight"]
    saved = read64(out)
    assert_matches(saved, ref)
    assert config(out)["tie_word_embeddings"] is False
    assert [w.message for w in warnings if "lm_head.weight" in w.message and "embed_tokens" in w.message]
    model = reload_and_run(out)
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"].float())


def test_tied_with_untied_stays_tied(root, interp, warnings, tmp_path):
    out = tmp_path / "mixed2"
    interp.eval(f'save(lerp(load("llama_tied/a"), load("llama_tied/base"), 0.25), "{out}")')
    base, a = read64(root / "llama_tied" / "base"), read64(root / "llama_tied" / "a")
    ref = {n: 0.75 * a[n] + 0.25 * base[n] for n in a}
    saved = read64(out)
    assert_matches(saved, ref)
    assert any("is not used" in w.message for w in warnings)
    assert_tied(reload_and_run(out), saved, config(out))


def test_untied_minus_untied_keeps_its_error(root, interp):
    """Only a model whose config ties its head stands in with its embedding."""
    with pytest.raises(AlgError, match="only on the left"):
        interp.eval('save(load("llama/a") - load("phi3/a"), "out/x")')


# ---- errors -------------------------------------------------------------------------------


def test_stack_of_different_sizes_is_positioned(interp):
    text = 'a = load("llama/a")\nsave(stack(layers(a, 0, 2), layers(load("llama48/base"), 1, 3)), "out/x")'
    with pytest.raises(AlgError) as e:
        interp.eval(text)
    err = e.value
    assert "shape [48] in part 2 but [32] in part 1" in err.message
    assert err.span.text() == 'layers(load("llama48/base"), 1, 3)'


def test_stack_of_different_architectures_is_positioned(interp):
    with pytest.raises(AlgError, match="part 2 names its layers 'transformer.h.N.'") as e:
        interp.eval('save(stack(load("llama/a"), load("gpt2/a")), "out/x")')
    assert e.value.span.text() == 'load("gpt2/a")'


def test_layers_needs_whole_numbers(interp):
    with pytest.raises(AlgError, match="whole number") as e:
        interp.eval('save(layers(load("llama/a"), 0.5, 2), "out/x")')
    assert e.value.span.text() == "0.5"


# ---- tensor roles: one owner, one table ------------------------------------------------------

# per architecture: the role of every tensor outside the layer stack, and the tensors whose
# rows are tokens (tied checkpoints store no head). Written from transformers' module names.
_LLAMA_ROLES = ({"model.embed_tokens.weight": "embedding", "model.norm.weight": "final_norm",
                 "lm_head.weight": "head"}, {"model.embed_tokens.weight", "lm_head.weight"})
_TIED_ROLES = ({"model.embed_tokens.weight": "embedding", "model.norm.weight": "final_norm"},
               {"model.embed_tokens.weight"})
ROLE_TABLE = {
    "llama": _LLAMA_ROLES, "mistral": _LLAMA_ROLES, "phi3": _LLAMA_ROLES, "qwen3": _LLAMA_ROLES,
    "qwen2": _TIED_ROLES, "gemma": _TIED_ROLES, "gemma2": _TIED_ROLES, "gemma3": _TIED_ROLES,
    "phi": ({"model.embed_tokens.weight": "embedding", "model.final_layernorm.weight": "final_norm",
             "model.final_layernorm.bias": "final_norm", "lm_head.weight": "head", "lm_head.bias": "post"},
            {"model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"}),
    "gpt2": ({"transformer.wte.weight": "embedding", "transformer.wpe.weight": "pre",
              "transformer.ln_f.weight": "final_norm", "transformer.ln_f.bias": "final_norm"},
             {"transformer.wte.weight"}),
    "gpt_neox": ({"gpt_neox.embed_in.weight": "embedding", "gpt_neox.final_layer_norm.weight": "final_norm",
                  "gpt_neox.final_layer_norm.bias": "final_norm", "embed_out.weight": "head"},
                 {"gpt_neox.embed_in.weight", "embed_out.weight"}),
    "falcon": ({"transformer.word_embeddings.weight": "embedding", "transformer.ln_f.weight": "final_norm",
                "transformer.ln_f.bias": "final_norm"}, {"transformer.word_embeddings.weight"}),
    # BERT's prediction bias has the vocabulary's rows: token rows although no name says so
    # (the old align name list missed it); its transform LayerNorm is not the final norm
    "bert": ({"bert.embeddings.word_embeddings.weight": "embedding",
              "bert.embeddings.position_embeddings.weight": "pre",
              "bert.embeddings.token_type_embeddings.weight": "pre",
              "bert.embeddings.LayerNorm.weight": "pre", "bert.embeddings.LayerNorm.bias": "pre",
              "cls.predictions.bias": "post",
              "cls.predictions.transform.dense.weight": "post", "cls.predictions.transform.dense.bias": "post",
              "cls.predictions.transform.LayerNorm.weight": "post",
              "cls.predictions.transform.LayerNorm.bias": "post"},
             {"bert.embeddings.word_embeddings.weight", "cls.predictions.bias"}),
}


def test_role_table_covers_every_architecture():
    assert set(ROLE_TABLE) == set(ALL)


@pytest.mark.parametrize("arch", ALL)
def test_tensor_roles(root, arch):
    """Every tensor of a saved checkpoint of each architecture has the role the table
    gives (layer tensors: "layer"), and the token rows are the table's, in tensor order."""
    from algebra.arch import arch_of
    from algebra.vocab import vocab_tensors

    src = open_checkpoint(root / arch / "a")
    roles, token_rows = ROLE_TABLE[arch]
    a = describe(src.tensors, src.config)
    got = {n: a.role(n) for n in src.tensors}
    want = {n: roles.get(n, "layer" if layer_index(arch, n) is not None else "?") for n in src.tensors}
    assert got == want
    assert set(a.token_rows) == token_rows
    assert list(a.token_rows) == [n for n in src.tensors if n in token_rows]
    assert a.vocab_rows == TINY_VOCAB
    assert all(a.is_token_rows(n) == (n in token_rows) for n in src.tensors)
    # the checks that used their own name lists ask the same owner
    assert vocab_tensors(_type(src)) == (TINY_VOCAB, a.token_rows)
    assert arch_of(_type(src)).token_rows == a.token_rows


def _type(src):
    from algebra.types import CheckpointType

    return CheckpointType(src.tensors, config=src.config)


def _spec(*shape: int):
    from algebra.types import TensorSpec

    return TensorSpec(tuple(shape), "F32")


# names, shapes and configs where the old name lists disagreed: builtins' merge called
# `score` and any `output` token rows, vocab.py's align did not; arch found no embedding
# padded past vocab_size while align took its rows
ROLE_CASES = {
    "reward model: the score head is no token row": (
        {"model.embed_tokens.weight": (96, 8), "model.layers.0.mlp.w": (8, 8), "model.layers.1.mlp.w": (8, 8),
         "model.norm.weight": (8,), "score.weight": (1, 8)},
        {"vocab_size": 96, "num_hidden_layers": 2},
        {"model.embed_tokens.weight": "embedding", "model.norm.weight": "final_norm", "score.weight": "score"},
        ("model.embed_tokens.weight",), 96),
    "classifier head of the vocabulary's width is still a score head": (
        {"bert.embeddings.word_embeddings.weight": (96, 8), "bert.encoder.layer.0.output.dense.weight": (8, 16),
         "bert.encoder.layer.1.output.dense.weight": (8, 16), "classifier.weight": (96, 8)},
        {"vocab_size": 96, "num_hidden_layers": 2},
        {"bert.embeddings.word_embeddings.weight": "embedding", "classifier.weight": "score"},
        ("bert.embeddings.word_embeddings.weight",), 96),
    "original Llama names: output. is the head, a layer's output. is not": (
        {"tok_embeddings.weight": (96, 8), "layers.0.attention.output.weight": (96, 8),
         "layers.1.attention.output.weight": (96, 8), "norm.weight": (8,), "output.weight": (96, 8)},
        {"vocab_size": 96, "n_layers": 2, "tie_word_embeddings": False},
        {"tok_embeddings.weight": "embedding", "norm.weight": "final_norm", "output.weight": "head"},
        ("tok_embeddings.weight", "output.weight"), 96),
    "embedding padded past vocab_size": (
        {"model.embed_tokens.weight": (104, 8), "model.layers.0.mlp.w": (8, 8), "model.layers.1.mlp.w": (8, 8),
         "model.norm.weight": (8,), "lm_head.weight": (104, 8)},
        {"vocab_size": 96, "num_hidden_layers": 2, "tie_word_embeddings": False},
        {"model.embed_tokens.weight": "embedding", "model.norm.weight": "final_norm", "lm_head.weight": "head"},
        ("model.embed_tokens.weight", "lm_head.weight"), 104),
    "no config: names decide": (
        {"transformer.wte.weight": (96, 8), "transformer.wpe.weight": (96, 8), "transformer.h.0.mlp.w": (8, 8),
         "transformer.h.1.mlp.w": (8, 8), "transformer.ln_f.weight": (8,)},
        None,
        {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "pre",
         "transformer.ln_f.weight": "final_norm"},
        ("transformer.wte.weight",), 96),
}


@pytest.mark.parametrize("case", sorted(ROLE_CASES))
def test_roles_where_the_old_name_lists_disagreed(case):
    shapes, cfg, roles, token_rows, rows = ROLE_CASES[case]
    a = describe({n: _spec(*s) for n, s in shapes.items()}, cfg)
    assert {n: a.role(n) for n in shapes} == {n: roles.get(n, "layer") for n in shapes}
    assert a.token_rows == token_rows and a.vocab_rows == rows


def _write(folder: Path, shapes: dict, cfg: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(len(str(folder)))
    save_file({n: torch.randn(s, generator=g) for n, s in shapes.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_merge_refuses_score_heads_of_different_widths(tmp_path, warnings):
    """Regression: merge's own name list called `score` token rows, so reward models with 1
    and 2 labels were merged on row 0 with a warning about token ids."""
    base = {"model.embed_tokens.weight": (96, 8), "model.layers.0.mlp.w": (8, 8),
            "model.layers.1.mlp.w": (8, 8), "model.norm.weight": (8,)}
    cfg = {"vocab_size": 96, "num_hidden_layers": 2}
    _write(tmp_path / "rm1", {**base, "score.weight": (1, 8)}, cfg)
    _write(tmp_path / "rm2", {**base, "score.weight": (2, 8)}, cfg)
    interp = Interpreter(options=Options(device="cpu", warn=warnings.append), base_dir=tmp_path)
    with pytest.raises(AlgError, match=r"'score.weight' has shape \[1, 8\] in rm but \[2, 8\] in lm"):
        interp.eval('save(merge(load("rm1"), load("rm2"), 0.5), "out")')


def test_layer_output_tensors_are_not_token_rows(tmp_path, warnings):
    """Regression: an unanchored `output` made a BERT layer's output.dense a token-row
    tensor: merge merged its leading rows, and `+` blamed the vocabularies."""
    def shapes(h):
        return {"bert.embeddings.word_embeddings.weight": (96, 8),
                **{f"bert.encoder.layer.{i}.output.dense.weight": (h, 16) for i in range(2)}}
    cfg = {"vocab_size": 96, "num_hidden_layers": 2}
    _write(tmp_path / "x", shapes(8), cfg)
    _write(tmp_path / "y", shapes(12), cfg)
    interp = Interpreter(options=Options(device="cpu", warn=warnings.append), base_dir=tmp_path)
    with pytest.raises(AlgError, match=r"output.dense.weight' has shape \[8, 16\] in rm but \[12, 16\]"):
        interp.eval('save(merge(load("x"), load("y"), 0.5), "out")')
    with pytest.raises(AlgError, match=r"output.dense.weight' has shape \[8, 16\] on the left") as e:
        interp.eval('save(load("x") + load("y"), "out")')
    assert not any("vocabularies differ" in n.message for n in e.value.notes)
    # and token rows that do differ still get the hint
    _write(tmp_path / "z", {**shapes(8), "bert.embeddings.word_embeddings.weight": (100, 8)},
           {**cfg, "vocab_size": 100})
    with pytest.raises(AlgError) as e:
        interp.eval('save(load("x") + load("z"), "out")')
    assert any("vocabularies differ" in n.message for n in e.value.notes)
