"""generate's batched greedy decoding on SmolLM2 with its real ChatML template equals the
one-prompt-at-a-time loop, for prompts of different lengths (left padding)."""

from __future__ import annotations

import pytest
import torch

from algebra.reward.generate import GenerateSpec, encode, sample, sample_batch

pytestmark = pytest.mark.real

PROMPTS = (
    "What is 2 plus 2?",
    "Name a primary color.",
    "Explain in one sentence why the sky is blue, for a child who is five years old and curious.",
    (("system", "You answer in one word."), ("user", "What do bees make?")),
)


def test_greedy_batched_equals_one_at_a_time(real, real_tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real["base"], dtype=torch.float32).eval()
    text = real_tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                        add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")  # the real ChatML template
    lengths = [len(encode(real_tok, p)) for p in PROMPTS]
    assert max(lengths) - min(lengths) > 10
    spec = GenerateSpec(PROMPTS, 1, 0.0, 12, 0)
    alone = {p: sample(model, real_tok, spec, p, "cpu") for p in PROMPTS}
    assert len({v[0] for v in alone.values()}) == len(PROMPTS)
    assert sample_batch(model, real_tok, spec, PROMPTS, "cpu") == alone
    # a stop string cuts each row where its own text has it
    stop = GenerateSpec(PROMPTS, 1, 0.0, 12, 0, (" ",))
    assert sample_batch(model, real_tok, stop, PROMPTS, "cpu") == {p: [v[0].split(" ")[0]] for p, v in alone.items()}
