"""Tiny models and tokenizers built from a config, for tests and examples (no downloads).

A word-level tokenizer over a few dozen everyday words (some of them in VADER's lexicon, so the
sentiment reward is not constantly zero) and a randomly initialised GPT-2, Llama or another family
(`ARCHITECTURES`) of a few thousand parameters: enough to exercise every code path of the environment
in milliseconds per step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

__all__ = ["DEFAULT_VOCAB", "CHAT_TEMPLATE", "SAMPLE_PROMPTS", "make_tiny_tokenizer", "make_tiny_model_dir",
           "make_tiny_reward_model_dir", "ARCHITECTURES"]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<bos>")

DEFAULT_VOCAB: tuple[str, ...] = (
    "write", "one", "sentence", "about", "the", "a", "sea", "sun", "rain", "dog", "cat", "bread",
    "coffee", "garden", "city", "music", "friend", "morning", "is", "was", "very", "so", "and", "it",
    "i", "you", "we", "love", "like", "hate", "good", "great", "happy", "wonderful", "nice", "bad",
    "sad", "terrible", "awful", "calm", "blue", "warm", "cold", "today", "always", "never", ".",
    ",", "!", "?", "user", "assistant", ":",
)

# prompts made of DEFAULT_VOCAB words, so nothing maps to <unk>
SAMPLE_PROMPTS: tuple[str, ...] = (
    "Write one sentence about the sea.",
    "Write one sentence about the cat.",
    "the morning sun is warm",
    "i like coffee",
    "Write one sentence about the city.",
)

# A minimal chat template in the usual Jinja form, so the chat-template code path runs offline.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tiny_tokenizer(
    vocab: Sequence[str] = DEFAULT_VOCAB, *, chat_template: str | None = None, pad_token: bool = True
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: ids 0-3 are the special tokens, then `vocab` in order."""
    words = list(dict.fromkeys([*SPECIAL_TOKENS, *vocab]))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    # split on whitespace and punctuation so "sea." gives ["sea", "."]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
        pad_token="<pad>" if pad_token else None,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# Llama-style families for tests of model-specific paths (Gemma 2: soft-capped logits, sliding
# windows; Cohere: scaled logits); each gets the same tiny shape
_LLAMA_LIKE = {
    "llama": {"tie_word_embeddings": True},
    "qwen2": {},
    "mistral": {},
    "gemma2": {"head_dim": 16, "final_logit_softcapping": 3.0, "sliding_window": 8, "query_pre_attn_scalar": 16},
    "cohere": {"logit_scale": 0.5},
    "granite": {"logits_scaling": 2.0},
}
ARCHITECTURES: tuple[str, ...] = ("gpt2", *_LLAMA_LIKE)
"""The `arch` values `make_tiny_model_dir` builds."""


def _causal_lm(arch: str, vocab_size: int, n_layer: int, n_embd: int, tokenizer) -> torch.nn.Module:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=n_embd, n_layer=n_layer,
                            n_head=2, **ids)
        return GPT2LMHeadModel(config)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=2 * n_embd,
                             num_hidden_layers=n_layer, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=256, tie_word_embeddings=True, **ids)
        return LlamaForCausalLM(config)
    if arch in _LLAMA_LIKE:
        config = AutoConfig.for_model(
            arch, vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=2 * n_embd,
            num_hidden_layers=n_layer, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=256, **ids, **_LLAMA_LIKE[arch],
        )
        return AutoModelForCausalLM.from_config(config)
    raise ValueError(f"arch={arch!r} is not supported; use one of {ARCHITECTURES}")


def make_tiny_model_dir(
    path: str | os.PathLike,
    *,
    vocab: Sequence[str] = DEFAULT_VOCAB,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 32,
    arch: str = "gpt2",
    chat_template: str | None = None,
    pad_token: bool = True,
) -> Path:
    """Save a randomly initialised causal LM and its tokenizer to `path`; returns the directory.

    Loadable with `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`,
    or directly as `gym.make("TextRLHF-v0", model=path)`.
    """
    path = Path(path)
    tokenizer = make_tiny_tokenizer(vocab, chat_template=chat_template, pad_token=pad_token)
    torch.manual_seed(seed)
    model = _causal_lm(arch, len(tokenizer), n_layer, n_embd, tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_reward_model_dir(
    path: str | os.PathLike,
    *,
    vocab: Sequence[str] = DEFAULT_VOCAB,
    seed: int = 0,
    n_layer: int = 1,
    n_embd: int = 16,
    arch: str = "gpt2",
) -> Path:
    """Save a randomly initialised one-label sequence-classification model and tokenizer to `path`."""
    path = Path(path)
    tokenizer = make_tiny_tokenizer(vocab)
    torch.manual_seed(seed)
    lm = _causal_lm(arch, len(tokenizer), n_layer, n_embd, tokenizer)
    lm.config.num_labels = 1
    cls = GPT2ForSequenceClassification if arch == "gpt2" else LlamaForSequenceClassification
    model = cls(lm.config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
