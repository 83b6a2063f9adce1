"""PPOConfig(device=...): the policy, the buffer and a text env's model agree on one device.

CPU everywhere; the CUDA tests run where a GPU is present and are skipped (not faked) elsewhere.
"""

from __future__ import annotations

import re

import gymnasium as gym
import pytest
import torch

import textenv  # noqa: F401  (registers TextRLHF-v0)
from agents import PPO, PPOConfig
from textenv.testing import SAMPLE_PROMPTS, make_tiny_model_dir

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("device_llama"), arch="llama", seed=0, n_layer=2, n_embd=32)


def _text_envs(model_dir, device="cpu"):
    return gym.make_vec("TextRLHF-v0", num_envs=2, model=str(model_dir), reward="length",
                        prompts=list(SAMPLE_PROMPTS), max_new_tokens=4, device=device)


def _cartpole(device):
    return PPO("CartPole-v1", PPOConfig(num_envs=2, num_steps=16, num_minibatches=2, update_epochs=2, seed=0,
                                        device=device))


def _devices(agent):
    return {p.device for p in agent.policy.parameters()} | {agent.buffer.obs.device, agent.buffer.values.device}


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cartpole_trains_on_the_chosen_device(device):
    agent = _cartpole(device)
    expected = torch.device("cuda", 0) if device == "auto" and torch.cuda.is_available() else torch.device("cpu")
    assert agent.device == expected and _devices(agent) == {expected}
    agent.learn(64, progress=False)
    assert agent.iteration == 2 and agent.episodes


def test_auto_follows_the_text_envs_model(model_dir):
    agent = PPO(_text_envs(model_dir), PPOConfig(num_steps=4, whole_episodes=True, seed=0))
    assert agent.device == torch.device("cpu") and _devices(agent) == {torch.device("cpu")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(ValueError, match=re.escape("PPOConfig.device='cuda', but torch sees no CUDA device here: "
                                                   "use device='cpu' or device='auto'")):
        _cartpole("cuda")


@cuda
def test_a_text_env_on_another_device_is_refused(model_dir):
    with pytest.raises(ValueError, match=r"PPOConfig.device='cuda:0', but the env's model is on cpu"):
        PPO(_text_envs(model_dir, device="cpu"), PPOConfig(num_steps=4, whole_episodes=True, device="cuda:0"))


@cuda
def test_cartpole_on_cuda_samples_what_the_cpu_samples():
    # one CPU generator draws every random number: the first rollout's actions agree across devices
    runs = []
    for device in ("cpu", "cuda"):
        agent = _cartpole(device)
        with torch.inference_mode():
            agent.collect_rollout()
        runs.append(agent.buffer.actions.cpu())
    assert torch.equal(*runs)
    agent.learn(64, progress=False)
    assert _devices(agent) == {torch.device("cuda", 0)}


@cuda
def test_text_ppo_on_cuda_keeps_the_ratio_exact(model_dir, first_rollout_log_ratios):
    agent = PPO(_text_envs(model_dir, device="cuda"), PPOConfig(num_steps=4, whole_episodes=True, seed=0))
    assert agent.device.type == "cuda" and _devices(agent) == {agent.device}
    log_ratio, _ = first_rollout_log_ratios(agent)
    assert log_ratio.abs().max() < 1e-5
    agent.learn(agent.config.batch_size, progress=False)
