"""Hostile and unlucky files and paths (issue 9, "Paths", "Encoding", "Inputs that lie";
issue 8, defect 1): every one is a positioned user error that says what the path is, or
it works. Nothing here may hang, eat memory or print a traceback.

The rules are those of `algebra/io/files.py`: only regular files are read, at most
ALG_MAX_FILE_MB of them, and text must be UTF-8.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from algebra.check import Checker
from algebra.cli import main
from algebra.errors import AlgError, AlgIOError
from algebra.io.checkpoint import open_checkpoint
from algebra.io.files import DEFAULT_MAX_FILE_MB, MAX_FILE_ENV, max_file_bytes, read_source
from algebra.io.safetensors import SafetensorsFile
from algebra.io.tokenizer import MAX_TOKEN_ID, read_vocab
from algebra.options import Options
from algebra.parser import parse
from algebra.reward.data import read_pairs, read_responses
from algebra.source import Source

LONG = "a" * 300  # one name past NAME_MAX (255 on Linux): ENAMETOOLONG


def check(text: str, base: Path):
    ck = Checker(Options(device="cpu"), base, mode="eval")
    return ck.check(parse(Source(text, "t.alg", base / "t.alg")))


def check_error(text: str, base: Path, quoted: str) -> AlgError:
    """The error checking `text` gives; it must be positioned at the quoted path."""
    with pytest.raises(AlgError) as info:
        check(text, base)
    err = info.value
    assert err.span is not None, err.format()
    assert err.span.text() == quoted, (err.span.text(), quoted)
    return err


def model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(6, dtype=torch.float32)}, folder / "model.safetensors")
    return folder


PAIRS_ROW = {"prompt": "p", "chosen": "a", "rejected": "b"}


# ---- issue 8, defect 1: a valid safetensors file is never taken for a pickle ---------------


def _safetensors_with_header_length(path: Path, length: int, t: torch.Tensor) -> None:
    """A valid safetensors file whose 8-byte header length is exactly `length`."""
    header = {"w": {"dtype": "F32", "shape": list(t.shape), "data_offsets": [0, t.numel() * 4]}}
    raw = json.dumps(header).encode()
    assert len(raw) <= length
    raw += b" " * (length - len(raw))  # trailing whitespace is valid JSON (the format pads so)
    path.write_bytes(struct.pack("<Q", length) + raw + t.numpy().tobytes())


# every low byte, the PROTO-like 0x80 0x02..0x05 starts, "PK" and the full zip magic "PK\3\4"
HEADER_LENGTHS = [512 + b for b in range(256)] + [0x0380, 0x0480, 0x0580, 0x4B50, 0x04034B50]


def test_every_header_length_loads(tmp_path):
    t = torch.linspace(-1, 1, 5)
    for length in HEADER_LENGTHS:
        path = tmp_path / "m.safetensors"
        _safetensors_with_header_length(path, length, t)
        f = SafetensorsFile(path)
        try:
            assert torch.equal(f.read("w"), t), hex(length)
        finally:
            f.close()
    # the big ones really start with the bytes a pickle sniffer looks for
    _safetensors_with_header_length(path, 0x04034B50, t)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    _safetensors_with_header_length(path, 0x0280, t)
    assert path.read_bytes()[:2] == b"\x80\x02"


def test_safetensors_lib_agrees_on_the_0x80_case(tmp_path):
    from safetensors.torch import load_file

    t = torch.linspace(-1, 1, 5)
    path = tmp_path / "m.safetensors"
    _safetensors_with_header_length(path, 0x2D80, t)  # the TinyLlama shard of issue 8
    assert torch.equal(load_file(path)["w"], t)
    assert torch.equal(open_checkpoint(path).read("w"), t)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_real_torch_save_files_are_refused(tmp_path, legacy):
    state = {"w": torch.zeros(3)}
    # named .safetensors, so that only the content can tell
    disguised = tmp_path / "model.safetensors"
    torch.save(state, disguised, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(AlgIOError, match="is a pickle checkpoint; loading pickle can run arbitrary code"):
        SafetensorsFile(disguised)
    # and by suffix, in a folder
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(AlgIOError, match="pytorch_model.bin' is a pickle checkpoint"):
        open_checkpoint(folder)


def test_pickle_named_by_suffix_is_refused_even_if_it_parses(tmp_path):
    path = tmp_path / "weights.pt"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(AlgIOError, match="pickle checkpoint"):
        open_checkpoint(path)


def test_save_pretrained_sharded_checkpoint_loads(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(tmp_path / "hf", max_shard_size="10KB")
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    # the case of issue 8: some shard's header length has the low byte 0x80 (a tensor per
    # shard makes headers of one small size, 0x80 bytes for a layer norm)
    lengths = [struct.unpack("<Q", s.read_bytes()[:8])[0] for s in shards]
    assert any(n % 256 == 0x80 for n in lengths), [hex(n) for n in lengths]
    src = open_checkpoint(tmp_path / "hf")
    state = m.state_dict()
    assert set(src.tensors) == set(state)
    for name, t in state.items():
        assert torch.equal(src.read(name).reshape(t.shape), t), name
    assert src.config["num_hidden_layers"] == 2


# ---- config.json and the index: "inputs that lie" ------------------------------------------


@pytest.mark.parametrize("content, said", [
    ("[1, 2]", "must hold a JSON object ({...}), not a list"),
    ("null", "not null"),
    ('"x"', "not a string"),
    ("{bad", "is not valid JSON"),
])
def test_config_that_is_not_an_object_is_an_error(tmp_path, content, said):
    folder = model(tmp_path / "m")
    (folder / "config.json").write_text(content)
    with pytest.raises(AlgIOError, match="config.json") as info:
        open_checkpoint(folder)
    assert said in info.value.message
    # a lone .safetensors file reads the config beside it the same way
    with pytest.raises(AlgIOError, match="config.json"):
        open_checkpoint(folder / "model.safetensors")
    # from a recipe: positioned at the load's path
    check_error('x = load("m")', tmp_path, '"m"')


@pytest.mark.parametrize("make, said", [
    (lambda p: p.mkdir(), "is a folder, not a regular file"),
    (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a regular file"),
    (lambda p: p.symlink_to("/dev/zero"), "is a character device, not a regular file"),
    (lambda p: p.symlink_to(p.name), "is a symlink that points to itself"),
])
def test_config_that_is_not_a_file_is_an_error(tmp_path, make, said):
    folder = model(tmp_path / "m")
    make(folder / "config.json")
    with pytest.raises(AlgIOError, match="config.json") as info:
        open_checkpoint(folder)
    assert said in info.value.message


def _sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "s"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, folder / "one.safetensors")
    save_file({"b": torch.ones(2)}, folder / "two.safetensors")
    return folder


def _index(folder: Path, value) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(value))


@pytest.mark.parametrize("value, said", [
    ([{"weight_map": {}}], "must hold a JSON object ({...}), not a list"),
    (None, "not null"),
    ({"weight_map": ["a"]}, "has no weight_map"),
    ({"weight_map": {"a": 5}}, "expected a tensor name and a file name"),
])
def test_index_that_is_not_an_object_is_an_error(tmp_path, value, said):
    folder = _sharded(tmp_path)
    _index(folder, value)
    with pytest.raises(AlgIOError, match="model.safetensors.index.json") as info:
        open_checkpoint(folder)
    assert said in info.value.message


def test_index_that_is_a_folder_is_an_error(tmp_path):
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").mkdir()
    with pytest.raises(AlgIOError, match="index.json' is a folder, not a regular file"):
        open_checkpoint(folder)


def test_index_pointing_outside_the_folder_is_refused(tmp_path):
    folder = _sharded(tmp_path)
    outside = tmp_path / "outside.safetensors"
    save_file({"b": torch.full((2,), 7.0)}, outside)
    for where in ["../outside.safetensors", str(outside), "sub/../../outside.safetensors"]:
        _index(folder, {"weight_map": {"a": "one.safetensors", "b": where}})
        with pytest.raises(AlgIOError, match="outside the model folder") as info:
            open_checkpoint(folder)
        assert where in info.value.message
    # inside is fine (and the same shards without tricks load)
    _index(folder, {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}})
    assert torch.equal(open_checkpoint(folder).read("b"), torch.ones(2))


def test_shard_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    folder = _sharded(tmp_path)
    (folder / "two.safetensors").unlink()
    os.mkfifo(folder / "two.safetensors")
    with pytest.raises(AlgIOError, match="two.safetensors' is a FIFO"):
        open_checkpoint(folder)


def test_safetensors_metadata_must_be_strings(tmp_path):
    path = tmp_path / "m.safetensors"
    raw = json.dumps({"__metadata__": [1], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(AlgIOError, match="__metadata__ is not an object of strings"):
        SafetensorsFile(path)


# ---- tokenizer files --------------------------------------------------------------------------


@pytest.mark.parametrize("content, said", [
    ({"model": {"vocab": {"a": 0, "b": MAX_TOKEN_ID}}}, f"outside [0, {MAX_TOKEN_ID})"),
    ({"model": {"vocab": {"a": 0, "b": -1}}}, "outside [0,"),
    ({"model": {"vocab": {"a": "x"}}}, "is malformed: ValueError"),
    ({"model": {"vocab": {"a": 0}}, "added_tokens": [{"content": "z"}]}, "is malformed: KeyError"),
    ([1], "has no tokenizer model"),
])
def test_hostile_tokenizer_json(tmp_path, content, said):
    (tmp_path / "tokenizer.json").write_text(json.dumps(content))
    with pytest.raises(AlgIOError, match="tokenizer.json") as info:
        read_vocab(tmp_path)
    assert said in info.value.message


def test_tokenizer_json_that_is_a_folder_is_an_error(tmp_path):
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(AlgIOError, match="is a folder, not a regular file"):
        read_vocab(tmp_path)


# ---- paths: NUL, too long, loops, devices, FIFOs ----------------------------------------------


def _dev_stdin() -> str:
    mode = os.stat("/proc/self/fd/0").st_mode if os.path.exists("/proc/self/fd/0") else None
    if mode is None or stat.S_ISREG(mode):
        pytest.skip("stdin is a regular file here (or there is no /proc)")
    return "/proc/self/fd/0"


def _bad_paths(tmp_path: Path) -> list[tuple[str, str]]:
    """(path as written in a recipe, what the error must say)."""
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "ping").symlink_to("pong")
    (tmp_path / "pong").symlink_to("ping")
    (tmp_path / "dangling").symlink_to("nowhere")
    os.mkfifo(tmp_path / "fifo")
    return [
        ("a\\u0000b", "contains a NUL byte"),
        (LONG, "is longer than the system allows"),
        ("loop", "is a symlink that points to itself"),
        ("ping", "is a symlink loop"),
        ("dangling", "is a symlink to 'nowhere', which does not exist"),
        ("/dev/zero", "is a character device"),
        ("fifo", "is a FIFO (named pipe)"),
    ]


def test_bad_model_paths(tmp_path):
    for path, said in _bad_paths(tmp_path):
        err = check_error(f'x = load("{path}")', tmp_path, f'"{path}"')
        assert said in err.message, (path, err.message)


@pytest.mark.parametrize("builtin", ["pairs", "responses"])
def test_bad_data_paths(tmp_path, builtin):
    (tmp_path / "folder").mkdir()
    # a folder is a data set (save_to_disk, Hub layout): an empty one holds no data files
    cases = _bad_paths(tmp_path) + [("folder", "is a folder with no data files")]
    for path, said in cases:
        err = check_error(f'x = {builtin}("{path}")', tmp_path, f'"{path}"')
        assert said in err.message, (path, err.message)


def test_data_from_the_terminal_or_pipe_is_refused(tmp_path):
    path = _dev_stdin()
    err = check_error(f'x = pairs("{path}")', tmp_path, f'"{path}"')
    assert "not a regular file; a data file must be a file" in err.message


def test_bad_import_paths(tmp_path):
    (tmp_path / "loop.alg").symlink_to("loop.alg")
    (tmp_path / "fifo.alg").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "fifo.alg")
    (tmp_path / "dir.alg").mkdir()
    for path, said in [
        ("a\\u0000b.alg", "contains a NUL byte"),
        (LONG + ".alg", "is longer than the system allows"),
        ("loop.alg", "is a symlink that points to itself"),
        ("fifo.alg", "is a FIFO (named pipe)"),
        ("dir.alg", "is a folder"),
    ]:
        with pytest.raises(AlgError) as info:
            check(f'import "{path}" as m', tmp_path)
        assert said in info.value.message, (path, info.value.message)
        assert info.value.span is not None and info.value.span.text().startswith("import")


def test_bad_recipe_paths_on_the_command_line(tmp_path, capsys):
    _bad_paths(tmp_path)  # makes the loop and the FIFO
    for path, said in [
        ("a\0b.alg", "contains a NUL byte"),
        (str(tmp_path / LONG), "is longer than the system allows"),
        (str(tmp_path / "loop"), "is a symlink that points to itself"),
        ("/dev/zero", "is a character device, not a regular file; a recipe file must be a file"),
        (str(tmp_path / "fifo"), "is a FIFO (named pipe)"),
    ]:
        assert main(["check", path]) == 1, path
        err = capsys.readouterr().err
        assert said in err, (path, err)
        assert "Traceback" not in err
    assert main(["check", str(tmp_path / "missing.alg")]) == 2
    assert "no such recipe file" in capsys.readouterr().err
    assert main(["check", str(tmp_path)]) == 2  # usage, like a missing file
    assert "is a directory, not a recipe file" in capsys.readouterr().err


def test_bad_files_for_convert_and_repl_load(tmp_path, capsys):
    import io

    from algebra.repl import Repl

    (tmp_path / "latin1.yml").write_bytes(b"merge_method: linear # caf\xe9\n")
    for path, said in [
        ("/dev/zero", "is a character device, not a regular file; a config file must be a file"),
        (str(tmp_path / "latin1.yml"), "is not UTF-8 text: byte 0xe9 at byte offset 26 (line 1, column 27)"),
    ]:
        assert main(["convert", "mergekit", path]) == 1, path
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    os.mkfifo(tmp_path / "fifo.alg")
    out = io.StringIO()
    repl = Repl(Options(device="cpu"), input=io.StringIO(":load fifo.alg\n:load /dev/zero\n1 + 1\n"),
                output=out, base_dir=tmp_path, interactive=True)
    assert repl.loop() == 0
    text = out.getvalue()
    assert "'" + str(tmp_path / "fifo.alg") + "' is a FIFO (named pipe)" in text
    assert "'/dev/zero' is a character device" in text
    assert "internal error" not in text and "2\n" in text


def test_pairs_of_dev_zero_does_not_eat_memory(tmp_path):
    """In a child limited to 1 GiB of address space: before, reading /dev/zero grew
    without bound (a MemoryError at best)."""
    code = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from algebra.errors import AlgError
        from algebra.reward.data import read_pairs
        try:
            read_pairs(Path("/dev/zero"), "/dev/zero")
        except AlgError as e:
            print(e.message)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'/dev/zero' is a character device, not a regular file" in r.stdout


# ---- the size limit -------------------------------------------------------------------------


def test_size_limit_is_documented_default_and_raisable(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_FILE_ENV, raising=False)
    assert max_file_bytes() == DEFAULT_MAX_FILE_MB * 2**20
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(PAIRS_ROW | {"id": i}) for i in range(200)) + "\n")
    size = data.stat().st_size
    assert size > 2048
    monkeypatch.setenv(MAX_FILE_ENV, str(1024 / 2**20))  # 1 KiB
    err = check_error('x = pairs("d.jsonl")', tmp_path, '"d.jsonl"')
    assert "over the 1024 bytes limit for a data file" in err.message
    assert any(MAX_FILE_ENV in n.message for n in err.notes)
    recipe = tmp_path / "big.alg"
    recipe.write_text("x = 1\n" * 400)
    with pytest.raises(AlgIOError, match="limit for a recipe file"):
        read_source(recipe)
    monkeypatch.setenv(MAX_FILE_ENV, "1")  # 1 MiB: both fit again
    assert len(check('pairs("d.jsonl")', tmp_path).result.rows) == 200
    assert read_source(recipe).text.count("\n") == 400
    monkeypatch.setenv(MAX_FILE_ENV, "lots")
    with pytest.raises(AlgIOError, match="ALG_MAX_FILE_MB='lots': expected a positive number"):
        max_file_bytes()


# ---- encoding ---------------------------------------------------------------------------------


def test_recipe_that_is_not_utf8_names_the_byte(tmp_path, capsys):
    recipe = tmp_path / "latin1.alg"
    recipe.write_bytes("x = 1\n# caf\u00e9\ny = 2\n".encode("latin-1"))
    assert main(["check", str(recipe)]) == 1
    err = capsys.readouterr().err
    # "x = 1\n# caf" is 11 bytes: the 0xe9 is byte 11, line 2, column 6
    assert "is not UTF-8 text: byte 0xe9 at byte offset 11 (line 2, column 6)" in err
    assert err.startswith(f"{recipe}:2:6: error:")
    assert "Traceback" not in err


def test_imported_file_that_is_not_utf8(tmp_path):
    (tmp_path / "lib.alg").write_bytes(b"a = 1\n\xff\xfe\n")
    with pytest.raises(AlgIOError) as info:
        check('import "lib.alg" as lib', tmp_path)
    err = info.value
    assert "byte 0xff at byte offset 6 (line 2, column 1)" in err.message
    assert err.span.location() == "lib.alg:2:1"
    assert any("while importing 'lib.alg'" in n.message for n in err.notes)


def test_recipe_with_a_byte_order_mark_reads(tmp_path, capsys):
    """Editors on Windows write a UTF-8 byte-order mark; it is not a character of the recipe."""
    recipe = tmp_path / "bom.alg"
    recipe.write_bytes(b"\xef\xbb\xbfx = 1\n")
    assert read_source(recipe).text == "x = 1\n"
    assert main(["check", str(recipe)]) == 0, capsys.readouterr().err


def test_data_that_is_not_utf8_names_the_byte(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(json.dumps(PAIRS_ROW).encode() + b"\n{\"prompt\": \"\xff\"}\n")
    err = check_error('x = pairs("d.jsonl")', tmp_path, '"d.jsonl"')
    assert "is not UTF-8 text: byte 0xff at byte offset" in err.message
    assert "(line 2, column 13)" in err.message


def test_jsonl_rows_split_only_at_newlines(tmp_path):
    """U+2028, U+0085 and a form feed are legal unescaped inside a JSON string; a row
    that holds one is one row (str.splitlines split it in two)."""
    rows = [{"prompt": f"a{sep}b", "response": "r"} for sep in ("\u2028", "\u0085", "\x0c")]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    data = read_responses(path, "d.jsonl")
    assert [r.prompt for r in data.rows] == [r["prompt"] for r in rows]
    assert [r.line for r in data.rows] == [1, 2, 3]


def test_deeply_nested_data_row_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(AlgIOError, match="d.jsonl:1:"):
        read_pairs(path, "d.jsonl")


def test_bad_output_paths_are_positioned_errors(tmp_path, family):
    """Paths that are written go through the same rules as those read: a NUL byte or a
    symlink loop on the way is said at the path argument (it was a ValueError or a
    RuntimeError traceback from `Path.resolve`)."""
    model(tmp_path / "m")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    cases = [("a\\u0000b", "contains a NUL byte"), ("loop/x", "goes through a symlink loop")]
    for path, said in cases:
        err = check_error(f'save(load("m"), "{path}")', tmp_path, f'"{path}"')
        assert said in err.message, (path, err.message)
    for path, said in [("a\\u0000b.jsonl", "contains a NUL byte"), ("loop/o.jsonl", "goes through a symlink loop")]:
        err = check_error(f'score(reward("{family["rm"]}"), "d.jsonl", "{path}")', tmp_path, f'"{path}"')
        assert said in err.message, (path, err.message)
