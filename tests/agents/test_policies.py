"""The MLP actor-critic: heads per action space, init, shared trunk, and action clipping."""

from __future__ import annotations

import math
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import PPO, PPOConfig
from agents.policies import MLPActorCritic, make_policy

BOX_OBS = spaces.Box(-1.0, 1.0, (3,), np.float32)


def test_discrete_log_probs_match_a_categorical():
    policy = make_policy(BOX_OBS, spaces.Discrete(4), PPOConfig())
    obs = torch.randn(5, 3)
    actions, logprob, value = policy.act(obs, generator=torch.Generator().manual_seed(0))
    logits = policy.actor_head(policy.actor_trunk(obs))
    reference = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(logprob, reference.log_prob(actions))
    _, entropy, _ = policy.evaluate(obs, actions)
    torch.testing.assert_close(entropy, reference.entropy())
    assert actions.dtype == torch.int64 and value.shape == (5,)


def test_gaussian_log_probs_match_a_normal_with_state_independent_std():
    policy = make_policy(BOX_OBS, spaces.Box(-2.0, 2.0, (2,), np.float32), PPOConfig(log_std_init=-0.5))
    obs = torch.randn(6, 3)
    actions, logprob, _ = policy.act(obs, generator=torch.Generator().manual_seed(0))
    mean = policy.actor_head(policy.actor_trunk(obs))
    std = torch.full_like(mean, math.exp(-0.5))
    reference = torch.distributions.Normal(mean, std)
    torch.testing.assert_close(logprob, reference.log_prob(actions).sum(-1))
    _, entropy, _ = policy.evaluate(obs, actions)
    torch.testing.assert_close(entropy, reference.entropy().sum(-1))
    assert [name for name, _ in policy.named_parameters() if "log_std" in name] == ["log_std"]


def test_box_actions_are_clipped_only_for_the_env():
    policy = make_policy(BOX_OBS, spaces.Box(-2.0, 2.0, (2,), np.float32), PPOConfig())
    raw = torch.tensor([[5.0, -7.0], [0.5, -0.25]])
    np.testing.assert_array_equal(policy.to_env_action(raw), [[2.0, -2.0], [0.5, -0.25]])
    assert raw[0, 0].item() == 5.0  # the stored action keeps its log-probability


def test_orthogonal_init_with_small_policy_head():
    policy = make_policy(BOX_OBS, spaces.Discrete(2), PPOConfig(hidden_sizes=(64, 64)))
    hidden = policy.actor_trunk[2].weight  # 64x64 square: W W^T = gain^2 I
    torch.testing.assert_close(hidden @ hidden.T, 2.0 * torch.eye(64), atol=1e-4, rtol=0)
    assert policy.actor_head.weight.norm().item() < 0.05
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in policy.modules() if isinstance(layer, torch.nn.Linear))


@pytest.mark.parametrize("shared", [True, False])
def test_shared_or_separate_trunks(shared):
    policy = make_policy(BOX_OBS, spaces.Discrete(2), PPOConfig(shared_trunk=shared))
    assert (policy.actor_trunk is policy.critic_trunk) is shared
    n_params = sum(p.numel() for p in policy.parameters())
    separate = MLPActorCritic(BOX_OBS, spaces.Discrete(2), PPOConfig(shared_trunk=False))
    assert (n_params < sum(p.numel() for p in separate.parameters())) is shared


def test_unsupported_action_space_is_named():
    env = gym.make("CartPole-v1")
    env.action_space = spaces.MultiDiscrete([2, 3])
    message = "action space MultiDiscrete([2 3]) is not supported: PPO handles Discrete and Box actions"
    with pytest.raises(ValueError, match=re.escape(message)):
        PPO(env, PPOConfig(num_envs=1, num_steps=8, num_minibatches=1))


def test_unknown_env_id_suggests_the_closest():
    message = "env='CartPole-v2' is not a registered Gymnasium id; did you mean 'CartPole-v1'?"
    with pytest.raises(ValueError, match=re.escape(message)):
        PPO("CartPole-v2")


@pytest.mark.parametrize("steps", [0, -10, 1.5])
def test_non_positive_timesteps_are_refused(steps):
    agent = PPO("CartPole-v1", PPOConfig(num_envs=1, num_steps=8, num_minibatches=1))
    with pytest.raises(ValueError, match=re.escape(f"total_timesteps={steps!r} must be a positive integer")):
        agent.learn(steps)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "Pendulum-v1"])
def test_predict_single_and_batched_observations(env_id):
    agent = PPO(env_id, PPOConfig(num_envs=2, num_steps=8, num_minibatches=1))
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    action = agent.predict(obs)
    assert env.action_space.contains(action)
    batch = agent.predict(np.stack([obs, obs]))
    assert len(batch) == 2
    with pytest.raises(ValueError, match="obs has shape"):
        agent.predict(np.zeros(17))


def test_a_bool_is_not_a_number_of_timesteps_and_callbacks_must_be_callable():
    agent = PPO("CartPole-v1", PPOConfig(num_envs=1, num_steps=8, num_minibatches=1))
    with pytest.raises(ValueError, match=re.escape("total_timesteps=True must be a positive integer")):
        agent.learn(True)
    with pytest.raises(ValueError, match=re.escape("callback=5 must be callable as callback(agent) -> bool | None")):
        agent.learn(8, callback=5)
    assert agent.global_step == 0


def test_config_may_be_a_dict_of_fields_and_nothing_else():
    agent = PPO("CartPole-v1", {"num_envs": 1, "num_steps": 8, "num_minibatches": 1})
    assert agent.config.num_steps == 8
    with pytest.raises(ValueError, match=re.escape("unknown PPOConfig key 'n_steps'; did you mean 'num_steps'?")):
        PPO("CartPole-v1", {"n_steps": 8})
    with pytest.raises(ValueError, match=re.escape("config='fast' must be a PPOConfig (or a dict of its fields)")):
        PPO("CartPole-v1", "fast")


def test_env_kwargs_typos_get_the_closest_argument():
    message = ("env_kwargs key 'max_episode_step' is not an argument of CartPole-v1 "
               "(gymnasium.envs.classic_control.cartpole:CartPoleEnv); did you mean 'max_episode_steps'?")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PPO("CartPole-v1", PPOConfig(num_envs=1, num_steps=8, num_minibatches=1), env_kwargs={"max_episode_step": 5})


def test_both_actor_critics_satisfy_the_protocol_ppo_drives_as_a_type_checker_sees_it(tmp_path):
    mypy = pytest.importorskip("mypy.api")
    checked = Path(__file__).with_name("policy_protocol_check.py")
    broken = tmp_path / "broken_policy.py"  # a policy without act / forward / value: the check must catch it
    broken.write_text("from agents.policies import ActorCritic\n\n\nclass Broken:\n    sequence_model = False\n\n\n"
                      "def as_policy(policy: Broken) -> ActorCritic:\n    return policy\n")
    report, _, status = mypy.run([str(checked), str(broken), "--follow-imports=silent", "--ignore-missing-imports",
                                  "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"])
    errors = [line for line in report.splitlines() if ": error:" in line]
    assert status == 1 and len(errors) == 1 and "broken_policy.py" in errors[0], report
