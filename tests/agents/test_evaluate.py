"""evaluate(): on a copy of whatever env the agent was built from; batched and KV-cached on token envs."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import textenv
from agents import PPO, PPOConfig
from textenv.testing import SAMPLE_PROMPTS, make_tiny_model_dir


class Corridor(gym.Env):
    """A registered-nowhere env (no spec): ``length`` steps of reward 1, whatever the actions."""

    observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, length: int = 5) -> None:
        self.length, self.t = length, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(2, self.t / self.length, np.float32), 1.0, self.t >= self.length, False, {}


def _config(**kwargs) -> PPOConfig:
    return PPOConfig(**{"seed": 0, "num_envs": 1, "num_steps": 16, "num_minibatches": 2, **kwargs})


def test_evaluate_an_agent_built_from_an_env_object():
    env = gym.make("CartPole-v1", max_episode_steps=20)
    agent = PPO(env, _config())
    mean, std = agent.evaluate(3)
    assert 0 < mean <= 20 and np.isfinite(std)  # a copy made from the spec: its time limit came along
    assert agent.envs.envs[0] is env  # the training env itself was neither closed nor replaced


def test_evaluate_an_env_without_a_spec_on_a_deep_copy():
    env = Corridor(length=5)
    agent = PPO(env, _config())
    assert env.spec is None
    assert agent.evaluate(2) == (5.0, 0.0)


def test_evaluate_an_agent_built_from_a_vector_env():
    agent = PPO(gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync"), _config())
    mean, _ = agent.evaluate(2)
    assert mean > 0


def test_evaluation_is_reproducible_and_leaves_training_alone():
    def run(evaluate: bool) -> PPO:
        agent = PPO("CartPole-v1", _config(num_envs=2)).learn(32, progress=False)
        if evaluate:
            first = agent.evaluate(3, deterministic=False)
            assert agent.evaluate(3, deterministic=False) == first
        return agent.learn(32, progress=False)

    with_eval, without = run(True), run(False)
    assert with_eval.episodes == without.episodes
    for a, b in zip(with_eval.policy.parameters(), without.policy.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_n_episodes_must_be_a_positive_integer(n):
    agent = PPO("CartPole-v1", _config())
    with pytest.raises(ValueError, match=re.escape(f"n_episodes={n!r} must be a positive integer, e.g. n_episodes=10")):
        agent.evaluate(n)


def test_evaluate_needs_a_single_env():
    agent = PPO("CartPole-v1", _config())
    with pytest.raises(ValueError, match=r"evaluate\(env=.*\) needs a single gymnasium.Env \(not a VectorEnv\)"):
        agent.evaluate(1, env=gym.make_vec("CartPole-v1", num_envs=2))


# ---------------------------------------------------------------------- token envs
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_lm"), seed=0, n_layer=2, n_embd=32)


MAX_NEW_TOKENS = 4


def _text_agent(tiny_lm, num_envs: int = 4) -> PPO:
    env_kwargs = dict(model=str(tiny_lm), reward="length", prompts=list(SAMPLE_PROMPTS), max_new_tokens=MAX_NEW_TOKENS)
    config = PPOConfig(num_envs=num_envs, num_steps=MAX_NEW_TOKENS, num_minibatches=1, seed=0, learning_rate=3e-3)
    return PPO("TextRLHF-v0", config, env_kwargs=env_kwargs).learn(1, progress=False)  # policy != reference now


def _count_trunk_calls(agent: PPO) -> list[int]:
    calls = [0]
    agent.policy.model.base_model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_text_evaluation_is_batched_on_the_kv_cache(tiny_lm, monkeypatch):
    agent = _text_agent(tiny_lm)
    copies = []
    monkeypatch.setattr(textenv.models, "frozen_copy", lambda *a, **k: copies.append(1))
    calls = _count_trunk_calls(agent)
    mean, std = agent.evaluate(8)  # two rounds of 4 episodes
    assert np.isfinite(mean) and np.isfinite(std)
    # per round one prompt forward and at most one per token, for all rows at once (one by one without the
    # cache it was 8 episodes x 4 tokens x 2 forwards)
    assert calls[0] <= 2 * (MAX_NEW_TOKENS + 1)
    assert copies == []  # the training env's frozen reference is shared, not copied
    assert agent.policy.envs is agent.envs


def test_text_evaluation_equals_playing_the_episodes_one_by_one(tiny_lm):
    agent = _text_agent(tiny_lm, num_envs=3)
    batched = agent.evaluate(5)  # rounds of 3 and then 2 episodes
    assert agent.evaluate(5) == batched
    handle = textenv.Shared(agent.envs.model)
    handle.references[None] = agent.envs.ref_model  # the same KL reference as in training
    single = gym.make("TextRLHF-v0", model=handle, tokenizer=agent.envs.tokenizer, reward="length",
                      prompts=list(SAMPLE_PROMPTS), max_new_tokens=MAX_NEW_TOKENS, kl_coef=agent.envs.kl_coef)
    one_by_one = agent.evaluate(5, env=single)
    assert batched == pytest.approx(one_by_one, rel=1e-4, abs=1e-5)
    assert batched[1] > 0  # the episodes differ: a real comparison


def test_text_evaluation_leaves_the_training_envs_alone(tiny_lm):
    agent = _text_agent(tiny_lm)
    obs = agent.envs.current_obs
    logprobs = agent.envs.next_logprobs.clone()
    agent.evaluate(4, deterministic=False)
    after = agent.envs.current_obs
    assert all(np.array_equal(obs[key], after[key]) for key in obs)
    torch.testing.assert_close(agent.envs.next_logprobs, logprobs, rtol=0, atol=0)
