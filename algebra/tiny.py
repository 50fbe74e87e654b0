"""Tiny checkpoints of real architectures, for tests and the demo (nothing is downloaded).

A "family" shares one base: a Llama causal LM with random weights, fine-tuned stand-ins
made by adding small seeded perturbations (task vectors), a sequence-classification
reward model on the same base, and a byte-level BPE tokenizer trained here with the
tokenizers library. Every checkpoint is saved by transformers itself, so the folders
look exactly like the Hub's.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 30? The answer is 42.",
    "Solve for x: 2x + 3 = 11, so x = 4.",
    "I'm sorry, but I can't help with that.",
    "A reward model scores a response to a prompt.",
    "Merging checkpoints is algebra on their weights.",
    "Let us think step by step about the integral of x squared.",
    "Please write a short poem about the sea.",
]


# a second corpus, for a tokenizer whose merges (and so ids) differ from CORPUS's
OTHER_CORPUS = [
    "Zebras graze on the savanna while lions sleep in the shade.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The orchestra tuned their violins before the symphony began.",
    "Quantum computers use qubits that can be in superposition.",
    "Bake the bread at two hundred degrees for forty minutes.",
    "The quick brown fox jumps over the lazy dog.",
]


def build_tokenizer(folder: Path, vocab_size: int = 320, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with pad/bos/eos and a chat template, saved to folder,
    trained on `corpus` (default CORPUS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, **extra,
    )


def perturb(state: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    """state + a seeded random task vector of relative size `scale`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            out[name] = (t.float() + scale * (t.float().std() if t.numel() > 1 else 1.0) * noise).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def build_family(
    root: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    names: tuple[str, ...] = ("base", "math", "rm", "rl1", "rl2"),
    extra_rm_vocab: int = 0,
    corpus: list[str] | None = None,
    tokenizer_size: int = 320,
) -> dict[str, Path]:
    """Save a family of checkpoints under root and return name -> folder. The first name
    is the base (a causal LM with random weights); a name "rm" is a sequence-classification
    reward model (one label, base + a task vector, a fresh score head); every other name is
    the base plus its own seeded task vector (math, rl1, rl2 by default).
    With extra_rm_vocab > 0 the reward model's vocabulary has that many more rows.
    `corpus` and `tokenizer_size` train a different tokenizer (see OTHER_CORPUS)."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    root = Path(root)
    tok_dir = root / "_tokenizer"
    tokenizer = build_tokenizer(tok_dir, tokenizer_size, corpus)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config(vocab, hidden, layers)).to(dtype)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    paths: dict[str, Path] = {}
    for i, name in enumerate(names):
        folder = root / name
        if name == "rm":
            rm_vocab = vocab + extra_rm_vocab
            cfg = llama_config(rm_vocab, hidden, layers, num_labels=1)
            model = LlamaForSequenceClassification(cfg).to(dtype)
            state = perturb({k: v for k, v in base_state.items() if k != "lm_head.weight"}, seed + 100 + i, 0.02)
            if extra_rm_vocab:
                emb = state["model.embed_tokens.weight"]
                extra = torch.randn((extra_rm_vocab, emb.shape[1]), generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
                state["model.embed_tokens.weight"] = torch.cat([emb, extra * emb.float().std().to(dtype)])
            state["score.weight"] = model.state_dict()["score.weight"]
            model.load_state_dict(state)
        else:
            model = LlamaForCausalLM(llama_config(vocab, hidden, layers)).to(dtype)
            state = base_state if i == 0 else perturb(base_state, seed + 100 + i, 0.02)
            model.load_state_dict(state)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths[name] = folder
    return paths


# ---- tiny checkpoints of many architectures ------------------------------------------------

# architecture -> (config class, model class, config arguments beyond the shared ones).
# Shared: vocab 96, hidden 32, 4 heads (2 key/value heads where the config has them).
# The tie column of each is transformers' own default unless set here.
ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # like Qwen2-0.5B
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": False, "head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {}),
    "bert": ("BertConfig", "BertForMaskedLM", {}),
}
TINY_VOCAB = 96


def arch_config(arch: str, layers: int = 3, hidden: int = 32, **extra):
    import transformers

    config_cls, _, own = ARCHS[arch]
    cls = getattr(transformers, config_cls)
    kw: dict = {"vocab_size": TINY_VOCAB, "bos_token_id": 1, "eos_token_id": 2, **own, **extra}
    if arch == "gpt2":
        kw.update(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    else:
        kw.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
        if arch not in ("gpt_neox", "bert", "falcon", "phi"):
            kw["num_key_value_heads"] = 2
    return cls(**kw)


def build_arch_family(
    root: Path,
    arch: str,
    *,
    names: tuple[str, ...] = ("base", "a", "b"),
    layers: int = 3,
    hidden: int = 32,
    seed: int = 0,
    tie: bool | None = None,
) -> dict[str, Path]:
    """A base of architecture `arch` (random weights, saved by transformers) and, for each
    further name, the base plus its own seeded perturbation of every parameter (a tied
    head is perturbed with its embedding, as one parameter). tie=True/False overrides the
    config's tie_word_embeddings for the perturbed models only: an untied base and a
    tied fine-tune share every tensor but the head."""
    import copy

    import transformers

    _, model_cls, _ = ARCHS[arch]
    cls = getattr(transformers, model_cls)
    root = Path(root)
    torch.manual_seed(seed)
    base = cls(arch_config(arch, layers, hidden)).eval()
    paths: dict[str, Path] = {}
    for i, name in enumerate(names):
        if i == 0:
            model = base
        elif tie is None:
            model = copy.deepcopy(base)
        else:
            model = cls(arch_config(arch, layers, hidden, tie_word_embeddings=tie)).eval()
            state = {k: v for k, v in base.state_dict().items() if not (tie and k == _head_name(base))}
            model.load_state_dict(state, strict=not tie)
        if i:
            g = torch.Generator().manual_seed(seed + 1000 * i)
            with torch.no_grad():
                for _, p in model.named_parameters():  # shared (tied) parameters appear once
                    std = float(p.std()) if p.numel() > 1 else 0.0
                    p.add_(0.05 * (std or 1.0) * torch.randn(p.shape, generator=g))  # norms start constant
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _head_name(model) -> str | None:
    head = model.get_output_embeddings()
    for n, p in model.named_parameters(remove_duplicate=False):
        if head is not None and p is head.weight:
            return n
    return None
def build_reward_models(root: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> dict[str, Path]:
    """Two tiny sequence-classification reward models with different weights sharing one
    tokenizer (stand-ins for a helpfulness and a harmlessness model), on the base of a
    Llama family that also holds a causal LM `policy` (the base itself) and a fine-tune
    `lm` (for DogeRM merges): returns name -> folder for rm-helpful, rm-harmless, policy, lm.
    The tokenizer has a chat template, so these models score chat-formatted text."""
    from transformers import LlamaForSequenceClassification

    root = Path(root)
    fam = build_family(root / "_family", hidden=hidden, layers=layers, seed=seed, names=("policy", "rm", "lm"))
    harmless = root / "rm-harmless"
    rm = LlamaForSequenceClassification.from_pretrained(fam["rm"], trust_remote_code=False)
    state = perturb(rm.state_dict(), seed + 500, 0.05)
    g = torch.Generator().manual_seed(seed + 501)
    state["score.weight"] = torch.randn(state["score.weight"].shape, generator=g) * state["score.weight"].std()
    rm.load_state_dict(state)
    rm.save_pretrained(harmless)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(fam["rm"], trust_remote_code=False).save_pretrained(harmless)
    out = {"rm-harmless": harmless}
    for name, new in (("rm", "rm-helpful"), ("policy", "policy"), ("lm", "lm")):
        out[new] = fam[name].rename(root / new)
    return out
