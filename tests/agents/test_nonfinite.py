"""NaN and inf never reach the weights or a checkpoint: caught where they enter, with where and why."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import VectorWrapper

from agents import PPO, NonFiniteError, PPOConfig
from agents.checkpoint import CheckpointError, save_checkpoint


def _config(**kwargs) -> PPOConfig:
    return PPOConfig(**{"seed": 0, "num_envs": 2, "num_steps": 8, "num_minibatches": 2, "update_epochs": 2, **kwargs})


class Poison(VectorWrapper):
    """Puts ``value`` into env ``index``'s reward (or observation entry 2) from the ``at``-th step on."""

    def __init__(self, envs, *, what: str, at: int, index: int = 1, value: float = float("nan")) -> None:
        super().__init__(envs)
        self.what, self.at, self.index, self.value, self.steps = what, at, index, value, 0

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.steps += 1
        if self.steps >= self.at and self.what == "reward":
            reward = np.array(reward, dtype=np.float64)
            reward[self.index] = self.value
        elif self.steps >= self.at:
            obs = np.array(obs, dtype=np.float64)
            obs[self.index, 2] = self.value
        return obs, reward, terminated, truncated, info


def _poisoned(what: str, at: int, **kwargs) -> PPO:
    envs = gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync")
    return PPO(Poison(envs, what=what, at=at, **kwargs), _config())


def test_a_nan_reward_names_the_env_and_the_step():
    agent = _poisoned("reward", at=5)
    message = ("env 1 returned reward nan at global step 8 (iteration 1, rollout step 4); rewards must be finite "
               "numbers within float32's range: fix the env's reward, or clip it (gymnasium.wrappers.ClipReward)")
    with pytest.raises(NonFiniteError, match=f"^{re.escape(message)}$"):
        agent.learn(64, progress=False)
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())


def test_a_reward_beyond_float32_is_as_bad_as_inf():
    agent = _poisoned("reward", at=1, index=0, value=1e39)
    with pytest.raises(NonFiniteError, match=re.escape("env 0 returned reward 1e+39 at global step 0")):
        agent.learn(16, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_observation_names_the_env_step_and_entry(value):
    agent = _poisoned("obs", at=3, value=value)
    message = (f"env 1 returned a non-finite observation from step() at global step 4 (iteration 1, rollout "
               f"step 2): obs[2] = {value!r}; observations must be finite")
    with pytest.raises(NonFiniteError, match=f"^{re.escape(message)}"):
        agent.learn(64, progress=False)


def test_a_non_finite_first_observation_is_caught_at_reset():
    class NanReset(gym.Wrapper):
        def reset(self, **kwargs):
            obs, info = self.env.reset(**kwargs)
            return obs * np.nan, info

    message = "env 0 returned a non-finite observation from reset() at global step 0 (the reset): obs[0] = nan"
    with pytest.raises(NonFiniteError, match=re.escape(message)):
        PPO(NanReset(gym.make("CartPole-v1")), _config(num_envs=1))


def _nan_values_for(agent: PPO, calls: set[int]) -> list[int]:
    """Make the policy's ``forward`` (what the update runs) return NaN values on the given (0-based) calls."""
    original, counter = agent.policy.forward, [0]

    def forward(*args, **kwargs):
        logprob, entropy, value = original(*args, **kwargs)
        if counter[0] in calls:
            value = value * float("nan")
        counter[0] += 1
        return logprob, entropy, value

    agent.policy.forward = forward
    return counter


def test_a_nan_loss_stops_training_before_the_optimizer_step():
    agent = PPO("CartPole-v1", _config())
    _nan_values_for(agent, {2})  # the first minibatch of the second epoch
    before = [p.detach().clone() for p in agent.policy.parameters()]
    message = ("the loss is nan at iteration 1, epoch 2 of 2, minibatch 1 of 2 (global step 16); the weights were "
               "not changed. Likely causes: learning_rate=0.003 too large, or rewards / observations of extreme "
               "size (try norm_reward=True, norm_obs=True, a smaller max_grad_norm); set "
               "PPOConfig.max_nonfinite_steps=N to skip up to N such steps in a row instead")
    with pytest.raises(NonFiniteError, match=f"^{re.escape(message)}$"):
        agent.learn(16, progress=False)
    after = list(agent.policy.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the first two steps happened


def test_non_finite_steps_are_skipped_and_counted_up_to_the_limit():
    agent = PPO("CartPole-v1", _config(max_nonfinite_steps=2))
    _nan_values_for(agent, {0, 1})  # two in a row: both skipped
    agent.learn(16, progress=False)
    assert agent.last_stats["losses/skipped_steps"] == 2.0
    assert np.isfinite(agent.last_stats["losses/value_loss"])
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())
    agent = PPO("CartPole-v1", _config(max_nonfinite_steps=2))
    _nan_values_for(agent, {0, 1, 2})  # a third in a row: too many
    with pytest.raises(NonFiniteError, match=re.escape("3 such steps in a row, more than "
                                                        "PPOConfig.max_nonfinite_steps=2")):
        agent.learn(16, progress=False)


def test_the_skip_streak_restarts_after_a_finite_step():
    agent = PPO("CartPole-v1", _config(max_nonfinite_steps=1))
    _nan_values_for(agent, {0, 2})  # finite step between them
    agent.learn(16, progress=False)
    assert agent.last_stats["losses/skipped_steps"] == 2.0


def test_an_infinite_gradient_with_a_finite_loss_is_caught():
    agent = PPO("CartPole-v1", _config())
    agent.policy.critic_head.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError, match=r"^the gradient norm is (inf|nan) \(the loss, [-\d.e]+, is finite\) at "
                                             r"iteration 1, epoch 1 of 2, minibatch 1 of 2"):
        agent.learn(16, progress=False)
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())


def test_a_learning_rate_that_overflows_the_weights_is_caught_after_the_step():
    agent = PPO("CartPole-v1", _config(learning_rate=1e39))
    with pytest.raises(NonFiniteError, match=r"^parameter '[\w.]+' holds \d+ non-finite values \(of \d+\) after the "
                                             r"optimizer step at iteration 1, epoch 1 of 2, minibatch 1 of 2 .*"
                                             r"learning_rate=1e\+39 is likely too large"):
        agent.learn(16, progress=False)


def test_a_huge_learning_rate_never_ends_silently():
    with pytest.raises(NonFiniteError):
        PPO("CartPole-v1", _config(learning_rate=1e38)).learn(256, progress=False)


def test_save_refuses_nan_weights_and_keeps_the_good_checkpoint(tmp_path):
    agent = PPO("CartPole-v1", _config())
    path = tmp_path / "agent.pt"
    agent.save(path)
    before = path.read_bytes()
    with torch.no_grad():
        agent.policy.actor_head.weight[0, 0] = float("nan")
    message = (f"refusing to save {str(path)!r}: policy['actor_head.weight'] holds 1 non-finite values (of 128); "
               "a checkpoint already at that path is left untouched.")
    with pytest.raises(NonFiniteError, match=f"^{re.escape(message)}"):
        agent.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["agent.pt"]


def test_load_refuses_a_checkpoint_with_nan_weights(tmp_path):
    from agents import checkpoint

    agent = PPO("CartPole-v1", _config())
    with torch.no_grad():
        agent.policy.critic_head.bias.fill_(float("inf"))
    save_checkpoint(checkpoint.agent_state(agent), tmp_path / "bad.pt")  # what an older version would write
    with pytest.raises(CheckpointError, match=re.escape("holds non-finite weights (policy['critic_head.bias']")):
        PPO.load(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "obs,entry", [([0.1, np.nan, 0.0, 0.2], "obs[1]"), ([[0.0] * 4, [0, 0, np.inf, 0]], "obs[1, 2]")]
)
def test_predict_refuses_a_non_finite_observation(obs, entry):
    agent = PPO("CartPole-v1", _config())
    with pytest.raises(NonFiniteError, match=f"^{re.escape(entry)} = (nan|inf) is not finite"):
        agent.predict(np.array(obs))
