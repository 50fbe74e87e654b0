"""Chat templates: the one a checkpoint folder carries, the named ones alg ships, a
template's syntax check, and the choice `save(..., chat_template=...)` makes.

A checkpoint's template is its `chat_template.jinja`, else the `chat_template` entry of
its `tokenizer_config.json` (a list of named templates: the one named "default"), as
transformers reads them. `save` accepts a name from `NAMED`, "auto" (the template that
most of the saved model's inputs carry: mergekit's rule) or a Jinja template's text.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

AUTO = "auto"
TEMPLATE_FILE = "chat_template.jinja"  # transformers' file, read before tokenizer_config.json

# The formats by their names in mergekit's configs. Each is written out here, on one line,
# so that no newline falls between turns.
NAMED = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}
# mergekit's other names, which alg does not ship (why: docs/mergekit.md)
NOT_SHIPPED = ("alpaca", "exaone", "mistral")


def folder_template(folder: Path | None) -> str | None:
    """The chat template a checkpoint folder carries, or None."""
    if folder is None:
        return None
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            ct = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        if isinstance(ct, list):  # named templates: the default one
            ct = next((t.get("template") for t in ct if isinstance(t, dict) and t.get("name") == "default"), None)
        return ct if isinstance(ct, str) else None
    return None


def most_common(folders: list[Path]) -> str | None:
    """The template most of `folders` carry (stripped, as mergekit compares them; a tie
    goes to the one met first), or None when none carries one."""
    found = [t.strip() for t in map(folder_template, folders) if t and t.strip()]
    return Counter(found).most_common(1)[0][0] if found else None


def input_folders(model) -> list[Path]:
    """The folders of the checkpoints a model value is computed from, each once, in the
    order its expression meets them."""
    found = [getattr(n.params[0], "folder", None) for n in model.node.walk() if n.op == "load"]
    return list(dict.fromkeys(f for f in found if f is not None))


def choose(value: str, folders: list[Path]) -> str | None:
    """The template text `save(..., chat_template=value)` writes, for a model computed
    from `folders`: a named one, the most common of theirs ("auto"; None when none
    carries one), or `value` itself as a template. ValueError says why not."""
    key = value.strip().lower()
    if key in NAMED:
        return NAMED[key]
    if key == AUTO:
        return most_common(folders)
    if key in NOT_SHIPPED:
        raise ValueError(f"alg does not ship a '{key}' chat template (it ships {', '.join(NAMED)}); "
                         "give the template's Jinja text, or \"auto\" for the inputs' own")
    if "{" not in value:
        from .errors import did_you_mean

        raise ValueError(f"chat_template '{value}' is neither a template (no {{% or {{{{) nor one of "
                         f"{', '.join([*NAMED, AUTO])}{did_you_mean(key, [*NAMED, AUTO])}")
    problem = syntax_error(value)
    if problem is not None:
        raise ValueError(f"chat_template is not a valid Jinja template: {problem[0]} (line {problem[1]} "
                         "of the template)")
    return value


def syntax_error(text: str) -> tuple[str, int] | None:
    """(message, line) of the first syntax error of a Jinja template as transformers
    compiles it (trimmed blocks, loop controls, its `{% generation %}` tag), or None."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' assistant-mask block: parsed, its body kept
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as e:
        return e.message or "invalid syntax", e.lineno or 1
    return None


def write(folder: Path, text: str) -> None:
    """Give the tokenizer files in `folder` the template `text`: `chat_template.jinja`,
    which transformers reads first, and the entry of `tokenizer_config.json` where it has
    one, for versions that read only that; a `chat_template.json` would disagree, so it
    goes."""
    (folder / TEMPLATE_FILE).write_text(text, encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "chat_template" in data:
            data["chat_template"] = text
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)


__all__ = ["AUTO", "NAMED", "NOT_SHIPPED", "TEMPLATE_FILE", "choose", "folder_template", "input_folders", "most_common",
           "syntax_error", "write"]
