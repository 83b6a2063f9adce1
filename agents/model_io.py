"""Loading the starting model of a pipeline stage and saving what the env and PPO load back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from textenv.models import quiet_transformers


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(path)


def _check_dir(path: str | os.PathLike, what: str) -> str:
    source = os.fspath(path)
    if not Path(source).is_dir():
        raise ValueError(f"{what} {source!r} is not a directory; pass a transformers model directory (save_pretrained)")
    return source


def load_causal_lm(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """A float32 causal LM and its tokenizer from a local directory."""
    from transformers import AutoModelForCausalLM

    source = _check_dir(path, "model")
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model, _tokenizer(source)


def load_reward_model_init(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """A one-output sequence classifier on the trunk at ``path`` (a causal LM, e.g. the SFT output).

    The trunk keeps its weights; the score head is new (drawn from the current torch seed). The
    config gets a pad id so batched transformers pooling works where the model is used elsewhere.
    """
    from transformers import AutoModelForSequenceClassification

    source = _check_dir(path, "model")
    tokenizer = _tokenizer(source)
    with quiet_transformers():  # "score.weight newly initialized" is the point here, not a warning
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_model(model: nn.Module, tokenizer: Any, output_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` of model and tokenizer into ``output_dir`` (created if needed)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out
