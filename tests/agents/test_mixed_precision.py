"""PPOConfig(mixed_precision="bf16"): the policy's forwards run in bfloat16; what PPO keeps stays float32."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

import textenv  # noqa: F401  (registers TextRLHF-v0)
from agents import PPO, PPOConfig
from textenv.testing import SAMPLE_PROMPTS, make_tiny_model_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("bf16") / "llama", arch="llama", seed=0,
                                   n_layer=2, n_embd=32))


def _agent(model_dir: str, mixed_precision: str) -> PPO:
    envs = gym.make_vec("TextRLHF-v0", num_envs=4, model=model_dir, reward="length", prompts=list(SAMPLE_PROMPTS),
                        max_new_tokens=6)
    config = PPOConfig(num_steps=6, whole_episodes=True, update_epochs=1, num_minibatches=1, seed=0,
                       mixed_precision=mixed_precision)
    return PPO(envs, config)


@pytest.mark.parametrize("mixed_precision, block_dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_bf16_runs_the_decoder_blocks_in_bfloat16_in_rollouts_and_updates(llama_dir, mixed_precision, block_dtype):
    agent = _agent(llama_dir, mixed_precision)
    seen: set[tuple[bool, torch.dtype]] = set()  # (with gradients, output dtype) of a decoder block's MLP
    mlp = agent.policy.model.model.layers[0].mlp
    mlp.register_forward_hook(lambda module, args, out: seen.add((torch.is_grad_enabled(), out.dtype)))
    agent.learn(24, progress=False)  # one rollout (no gradients) and one update (gradients)
    assert seen == {(False, block_dtype), (True, block_dtype)}
    # log-probs, values, weights and optimizer state stay float32
    assert agent.buffer.logprobs.dtype == agent.buffer.values.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in agent.policy.parameters())
    assert all(v.dtype == torch.float32 for s in agent.optimizer.state.values() for v in s.values() if v.numel() > 1)
    stats = agent.last_stats
    # the only minibatch step re-scores the rollout before its optimizer step: the ratio is 1 up to
    # bfloat16 rounding of the trunk (exactly 1 in float32)
    assert stats["losses/clipfrac"] == 0.0
    assert stats["losses/approx_kl"] < (1e-4 if mixed_precision == "bf16" else 1e-9)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if k.startswith("losses/"))


def test_mixed_precision_is_checked_and_refused_for_mlp_policies():
    with pytest.raises(ValueError, match="mixed_precision"):
        PPOConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="mixed_precision='no'"):
        PPO("CartPole-v1", PPOConfig(mixed_precision="bf16"))
