"""save(..., chat_template=...): the output tokenizer's chat template, by name, by the
inputs' plurality ("auto") or as a template's text; checked before anything is written,
and what transformers loads from the output (algebra/chat.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import quiet_interpreter

from algebra import AlgError, chat

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]

# The formats, written out by hand from their specifications (the reference the named
# templates are checked against); bos is the tiny tokenizer's "<s>".
EXPECTED = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n What is 2+2? <|im_end|>\n"
               "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"),
}
GENERATION_PROMPT = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}


def _save(tmp_path: Path, family, value: str, models=("base", "math")):
    interp = quiet_interpreter(tmp_path)
    loads = ", ".join(f'load("{family[m]}")' if m in family else f'load("{m}")' for m in models)
    interp.eval(f'save(linear([{loads}], weights=0.5), "out", chat_template={json.dumps(value)})')
    return tmp_path / "out", interp.warnings


@pytest.mark.parametrize("name", sorted(chat.NAMED))
def test_named_templates_render_their_format_in_transformers(family, tmp_path, name):
    from transformers import AutoTokenizer

    out, _ = _save(tmp_path, family, name)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == chat.NAMED[name]
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED[name]
    with_prompt = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert with_prompt == EXPECTED[name] + GENERATION_PROMPT[name]
    # the tokenizer's config agrees (transformers versions that read only that file)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg.get("chat_template", chat.NAMED[name]) == chat.NAMED[name]
    assert chat.folder_template(out) == chat.NAMED[name]


def test_a_template_text_is_written_as_given_and_old_files_disagreeing_go(family, tmp_path):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(family["base"], base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ 'old' }}"
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    (base / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'old' }}"}))
    text = "{% for m in messages %}[{{ m.role }}]{% generation %}{{ m.content }}{% endgeneration %}\n{% endfor %}"
    out, _ = _save(tmp_path, family, text, models=(str(base), "math"))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == text
    assert tok.apply_chat_template(CONVERSATION[:2], tokenize=False) == "[system]Be brief.[user] What is 2+2? "
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == text
    assert not (out / "chat_template.json").exists()


def _with_template(tmp_path: Path, family, name: str, template: str | None) -> str:
    folder = tmp_path / name
    shutil.copytree(family["math"], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_auto_takes_the_template_most_inputs_carry_first_met_on_a_tie(family, tmp_path):
    a, b = "{{ 'A' }}", "{{ 'B' }}"
    ins = [_with_template(tmp_path, family, n, t) for n, t in (("x1", a), ("x2", b), ("x3", b), ("x4", None))]
    out, warnings = _save(tmp_path, family, "auto", models=ins)
    assert chat.folder_template(out) == b and not warnings
    # a tie (one each, and one input without a template): the first met
    (tmp_path / "out2").mkdir()
    out, _ = _save(tmp_path / "out2", family, "auto", models=(ins[3], ins[0], ins[1]))
    assert chat.folder_template(out) == a
    # mergekit compares them stripped, and writes the stripped one
    assert chat.most_common([Path(_with_template(tmp_path, family, "x5", b + "\n")), Path(ins[0])]) == b


def test_auto_without_any_template_warns_and_keeps_the_files(family, tmp_path):
    ins = [_with_template(tmp_path, family, n, None) for n in ("y1", "y2")]
    out, warnings = _save(tmp_path, family, "auto", models=ins)
    assert not (out / "chat_template.jinja").exists()
    assert [w.message for w in warnings] == [
        'chat_template="auto": none of the inputs carries a chat template; the output\'s tokenizer '
        "files are written as they are"]


@pytest.mark.parametrize("value, message", [
    ("chatlm", "chat_template 'chatlm' is neither a template (no {% or {{) nor one of chatml, llama3, auto; "
               "did you mean 'chatml'?"),
    ("mistral", "alg does not ship a 'mistral' chat template (it ships chatml, llama3); give the template's "
                'Jinja text, or "auto" for the inputs\' own'),
    ("{% for m in messages %}\n{{ m.content }", "chat_template is not a valid Jinja template: unexpected '}' "
                                               "(line 2 of the template)"),
])
def test_a_bad_template_is_refused_at_its_argument_before_anything_is_written(family, tmp_path, value, message):
    interp = quiet_interpreter(tmp_path)
    recipe = f'save(load("{family["base"]}"), "out", chat_template={json.dumps(value)})'
    with pytest.raises(AlgError) as info:
        interp.eval(recipe)
    assert info.value.message == message
    assert info.value.span.text() == json.dumps(value)  # the argument, quotes included
    assert not (tmp_path / "out").exists()


def test_the_python_api_takes_the_same_values(family, tmp_path):
    interp = quiet_interpreter(tmp_path)
    res = interp.eval(f'lerp(load("{family["base"]}"), load("{family["math"]}"), 0.5)')
    res.save(tmp_path / "api", chat_template="llama3")
    assert chat.folder_template(tmp_path / "api") == chat.NAMED["llama3"]
    with pytest.raises(AlgError, match="'mistral'"):
        res.save(tmp_path / "api2", chat_template="mistral")
    assert not (tmp_path / "api2").exists()


def test_a_folder_s_template_is_read_as_transformers_reads_it(tmp_path):
    assert chat.folder_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert chat.folder_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # read first
    assert chat.folder_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("[not json")
    assert chat.folder_template(tmp_path) is None
