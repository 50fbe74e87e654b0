"""io/: the safetensors reader and writer, and checkpoint folders.

The reader is checked against the safetensors library itself; every corruption it
must catch from the header alone is made by hand here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from algebra.errors import AlgIOError
from algebra.io.checkpoint import MemorySource, file_sha256, open_checkpoint
from algebra.io.safetensors import SafetensorsFile, ShardLayout, ShardWriter
from algebra.types import TensorSpec


@pytest.fixture
def sample(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(11, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.half": torch.randn(3, 3, generator=g).half(),
        "e.scalar": torch.tensor(2.5),
    }
    path = tmp_path / "sample.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_reader_matches_safetensors(sample):
    f = SafetensorsFile(sample)
    ref = load_file(sample)
    assert set(f.tensors) == set(ref)
    for name, t in ref.items():
        assert f.tensors[name].spec == TensorSpec(tuple(t.shape), _code(t.dtype))
        got = f.read(name).reshape(t.shape)
        assert got.dtype == t.dtype
        assert torch.equal(got, t)
        # every flat sub-range is the same range of the reference
        flat = t.reshape(-1)
        n = flat.numel()
        for e0, e1 in [(0, 1), (1, n), (n // 2, n)]:
            if e0 < e1:
                assert torch.equal(f.read(name, e0, e1), flat[e0:e1])
    assert f.metadata == {"format": "pt"}
    f.close()


def _code(dtype: torch.dtype) -> str:
    from algebra.types import code_of

    return code_of(dtype)


def _rewrite_header(src: Path, dst: Path, edit) -> None:
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-(len(new)) % 8)
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("short", lambda raw, h: raw[:5], "only 5 bytes long"),
        ("huge_header", lambda raw, h: struct.pack("<Q", 10**9) + raw[8:], "header length 1000000000 exceeds"),
        ("not_json", lambda raw, h: raw[:8] + b"x" * (len(raw) - 8), "header is not valid JSON"),
        ("truncated", lambda raw, h: raw[:-3], "truncated: tensor"),
        ("pickle_zip", lambda raw, h: b"PK\x03\x04" + raw[4:], "is a pickle checkpoint"),
        ("pickle_proto", lambda raw, h: b"\x80\x04" + raw[2:], "is a pickle checkpoint"),
    ],
)
def test_reader_rejects_corrupt_files(sample, tmp_path, name, make, message):
    bad = tmp_path / f"{name}.safetensors"
    bad.write_bytes(make(sample.read_bytes(), None))
    with pytest.raises(AlgIOError) as info:
        SafetensorsFile(bad)
    assert message in info.value.message
    assert str(bad) in info.value.message


def _overlap(header: dict, moved: str, onto: str) -> None:
    """Point `moved`'s bytes (same length) at the start of `onto`'s."""
    start = header[onto]["data_offsets"][0]
    a, b = header[moved]["data_offsets"]
    header[moved]["data_offsets"] = [start, start + (b - a)]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["a.weight"].update(dtype="Q9"), "unknown dtype 'Q9'"),
        (lambda h: h["a.weight"].update(shape=[7, -5]), "invalid shape"),
        (lambda h: h["a.weight"].update(shape=[7, 6]), "needs 168 bytes but its data_offsets span 140"),
        (lambda h: h["a.weight"].update(data_offsets=[10, 5]), "invalid data_offsets"),
        (lambda h: h.update({"z": [1, 2]}), "entry for 'z' is not an object"),
        (lambda h: _overlap(h, "b.bias", "a.weight"), "overlap"),
    ],
)
def test_reader_rejects_bad_headers(sample, tmp_path, edit, message):
    bad = tmp_path / "bad.safetensors"
    _rewrite_header(sample, bad, edit)
    with pytest.raises(AlgIOError) as info:
        SafetensorsFile(bad)
    assert message in info.value.message


def test_writer_layout_is_valid_safetensors(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "x": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "y": torch.randn(5, generator=g),
        "z": torch.arange(3, dtype=torch.int64),
        "w": torch.randn(2, 3, generator=g).half(),
    }
    entries = [(n, TensorSpec(tuple(t.shape), _code(t.dtype))) for n, t in tensors.items()]
    layout = ShardLayout.build(entries, {"format": "pt"})
    path = tmp_path / "out.safetensors"
    w = ShardWriter(path, layout)
    # write in pieces, out of order: offsets are fixed, so order does not matter
    for name, t in reversed(tensors.items()):
        flat = t.reshape(-1)
        half = flat.numel() // 2
        w.write(name, half * t.element_size(), flat[half:])
        w.write(name, 0, flat[:half])
    w.close()
    assert path.stat().st_size == layout.size
    back = load_file(path)
    for name, t in tensors.items():
        assert torch.equal(back[name], t)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # 8-byte aligned data start, every tensor aligned to its element size
    for name, (start, _) in layout.offsets.items():
        assert start % tensors[name].element_size() == 0


def test_writer_refuses_out_of_bounds(tmp_path):
    layout = ShardLayout.build([("x", TensorSpec((4,), "F32"))], {})
    w = ShardWriter(tmp_path / "o.safetensors", layout)
    with pytest.raises(AssertionError):
        w.write("x", 8, torch.zeros(3))
    w.close()


def test_open_checkpoint_folder_file_and_index(family, tmp_path):
    src = open_checkpoint(family["base"])
    assert "model.embed_tokens.weight" in src.tensors
    assert src.config["architectures"] == ["LlamaForCausalLM"]
    assert {p.name for p in src.extra_files} >= {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    single = open_checkpoint(family["base"] / "model.safetensors")
    assert single.tensors == src.tensors
    # a sharded copy with an index
    state = load_file(family["base"] / "model.safetensors")
    names = list(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    half = len(names) // 2
    save_file({n: state[n] for n in names[:half]}, sharded / "model-00001-of-00002.safetensors")
    save_file({n: state[n] for n in names[half:]}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    s = open_checkpoint(sharded)
    assert set(s.tensors) == set(state)
    for n in names:
        assert torch.equal(s.read(n).reshape(state[n].shape), state[n])


def test_open_checkpoint_errors(family, tmp_path):
    with pytest.raises(AlgIOError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AlgIOError, match="holds no .safetensors file"):
        open_checkpoint(empty)
    pick = tmp_path / "pick"
    pick.mkdir()
    torch.save({"w": torch.zeros(1)}, pick / "pytorch_model.bin")
    with pytest.raises(AlgIOError, match="pickle checkpoint"):
        open_checkpoint(pick)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(AlgIOError, match="lists 'missing.safetensors'"):
        open_checkpoint(broken)
    dup = tmp_path / "dup"
    dup.mkdir()
    save_file({"a": torch.zeros(2)}, dup / "x.safetensors")
    save_file({"a": torch.zeros(2)}, dup / "y.safetensors")
    with pytest.raises(AlgIOError, match="appears in both"):
        open_checkpoint(dup)


def test_memory_source_reads_views(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    src = MemorySource({"t": t})
    assert src.tensors["t"] == TensorSpec((3, 4), "F32")
    assert torch.equal(src.read("t", 2, 7), torch.arange(2, 7, dtype=torch.float32))
    with pytest.raises(AlgIOError, match="not a tensor"):
        MemorySource({"x": [1, 2]})


def test_sha256_is_the_file_digest_and_cached(sample, tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("ALG_CACHE", str(tmp_path / "cache"))
    digest = hashlib.sha256(sample.read_bytes()).hexdigest()
    assert file_sha256(sample) == digest
    cached = list((tmp_path / "cache" / "sha256").iterdir())
    assert len(cached) == 1 and cached[0].read_text() == digest
    # a changed file (new mtime and size) is hashed again, not served from the cache
    sample.write_bytes(sample.read_bytes() + b" ")
    assert file_sha256(sample) == hashlib.sha256(sample.read_bytes()).hexdigest() != digest
