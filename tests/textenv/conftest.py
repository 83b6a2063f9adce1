from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import textenv  # noqa: F401  (registers TextRLHF-v0)
from textenv.testing import CHAT_TEMPLATE, SAMPLE_PROMPTS, make_tiny_model_dir, make_tiny_reward_model_dir

hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama", arch="llama"))


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory) -> str:
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "chat", chat_template=CHAT_TEMPLATE))


@pytest.fixture(scope="session")
def reward_dir(tmp_path_factory) -> str:
    return str(make_tiny_reward_model_dir(tmp_path_factory.mktemp("tiny") / "reward"))


@pytest.fixture
def policy(tiny_dir):
    """A fresh policy module per test (tests change its weights)."""
    return AutoModelForCausalLM.from_pretrained(tiny_dir)


@pytest.fixture
def make_env(tiny_dir):
    """gym.make("TextRLHF-v0") on the tiny model and test prompts; kwargs override."""

    def make(**kwargs):
        kwargs.setdefault("model", tiny_dir)
        kwargs.setdefault("prompts", list(SAMPLE_PROMPTS))
        kwargs.setdefault("max_new_tokens", 6)
        return gym.make("TextRLHF-v0", **kwargs)

    return make


@pytest.fixture
def boost():
    """boost(model, token, amount): make `token` more likely in every state (GPT-2 models)."""

    def boost_token(model, token: int, amount: float = 5.0) -> None:
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            # shift every final hidden state along the token's output embedding: its logit grows most
            model.transformer.ln_f.bias.add_(amount * head[token] / head[token].norm())

    return boost_token
