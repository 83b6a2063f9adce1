"""One distribution for sampling, the env's KL and the PPO ratio, whatever the model family.

Families transform logits after their output layer (Gemma 2 soft-caps them, Cohere and Granite
scale them); the rollout and the update must both apply that, so the first minibatch, before any
optimizer step, sees a ratio of exactly 1 (to float rounding) and nothing clipped.
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from transformers import AutoModelForCausalLM

import textenv
from agents import PPO, PPOConfig
from textenv.lm_head import LogitHead
from textenv.testing import ARCHITECTURES, SAMPLE_PROMPTS, make_tiny_model_dir


@pytest.fixture(scope="module", params=ARCHITECTURES)
def family_dir(request, tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), arch=request.param, seed=1)


def _agent(model_dir, *, checkpointed_share=0.0, **env_kwargs):
    envs = gym.make_vec(
        "TextRLHF-v0", num_envs=4, model=str(model_dir), reward="length", prompts=list(SAMPLE_PROMPTS),
        max_new_tokens=6, temperature=0.9, **env_kwargs,
    )
    return PPO(envs, PPOConfig(update_epochs=1, num_minibatches=1, seed=0, learning_rate=1e-3,
                               gradient_checkpointing=checkpointed_share > 0,
                               gradient_checkpointing_fraction=checkpointed_share or 1.0))


@pytest.mark.parametrize("sampling", [{}, {"top_k": 8, "top_p": 0.9}], ids=["full", "truncated"])
# checkpointing: blocks recomputed over a read-only prompt cache and the tokens scored in row slices;
# "half": one of the two blocks recomputed, the other keeping its activations, in the same forward
@pytest.mark.parametrize("checkpointed_share", [0.0, 1.0, 0.5], ids=["plain", "checkpointing", "half"])
def test_ratio_is_one_and_nothing_clips_before_the_first_step(
    family_dir, sampling, checkpointed_share, first_rollout_log_ratios
):
    agent = _agent(family_dir, checkpointed_share=checkpointed_share, **sampling)
    assert agent.policy.sliced_scores == (checkpointed_share > 0)
    blocks = agent.policy.model.config.num_hidden_layers
    assert len(agent.policy.checkpointed) == round(checkpointed_share * blocks)
    log_ratio, buf = first_rollout_log_ratios(agent)
    assert log_ratio.abs().max() < 1e-5
    # the same through PPO's own update: one minibatch, its statistics taken before the step
    buf.compute_advantages(torch.zeros(buf.num_envs), gamma=1.0, gae_lambda=0.95, estimator="gae")
    stats = agent.update()
    assert stats["losses/clipfrac"] == 0.0
    assert stats["losses/approx_kl"] < 1e-9


def test_env_scores_the_sampled_token_with_the_logits_of_the_models_own_forward(family_dir):
    """The env's log-probs are those of `model(...)` itself, soft-capping or scaling included."""
    env = gym.make("TextRLHF-v0", model=str(family_dir), reward="length", prompts=list(SAMPLE_PROMPTS),
                   max_new_tokens=3, temperature=0.9, chat_template=False)
    obs, _ = env.reset(seed=0)
    model = env.unwrapped.model
    mask = torch.as_tensor(obs["attention_mask"]).bool()
    ids = torch.as_tensor(obs["input_ids"])[mask][None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    expected = torch.log_softmax(logits.float() / 0.9, dim=-1)
    torch.testing.assert_close(env.unwrapped.next_logprobs, expected, atol=1e-5, rtol=0)


class _DoubledLogits(torch.nn.Module):
    """A causal LM whose forward rescales the logits in a way no config field announces."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.base_model_prefix = "inner"

    @property
    def base_model(self):
        return self.inner.base_model

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_a_model_whose_logits_cannot_be_reproduced_is_refused_at_construction(tmp_path):
    inner = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path, arch="llama"))
    with pytest.raises(textenv.ConfigError, match="computes its logits differently from its trunk"):
        LogitHead.of(_DoubledLogits(inner))
