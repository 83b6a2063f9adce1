"""Proof of learning, with fixed seeds: the preset, REINFORCE-with-baseline and PPO-Penalty."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from agents import PPO, PPOConfig


def test_cartpole_preset_solves_cartpole(stop_when_solved):
    agent = PPO("CartPole-v1", PPOConfig(seed=1))
    agent.learn(80_000, progress=False, callback=stop_when_solved(475))
    mean_return, _ = agent.evaluate(n_episodes=20)
    assert mean_return >= 475


@pytest.mark.parametrize("option", [{"advantage": "mc"}, {"policy_loss": "kl_penalty"}])
def test_each_seed_path_option_learns_cartpole(option, stop_when_solved):
    agent = PPO("CartPole-v1", PPOConfig(seed=0, **option))
    agent.learn(80_000, progress=False, callback=stop_when_solved(475))
    mean_return, _ = agent.evaluate(n_episodes=20)
    assert mean_return >= 475


def test_kl_penalty_adapts_beta():
    agent = PPO("CartPole-v1", PPOConfig(seed=0, policy_loss="kl_penalty", kl_beta=1.0, kl_target=1e-6))
    agent.learn(512, progress=False)
    assert agent.kl_beta > 1.0  # the KL of a real update is far above a 1e-6 target


def _run(seed: int, **kwargs) -> PPO:
    agent = PPO("CartPole-v1", PPOConfig(seed=seed, num_envs=2, num_steps=64, num_minibatches=2, **kwargs))
    return agent.learn(2_048, progress=False)


def test_same_seed_same_run_and_other_seed_other_run():
    first, second, other = _run(3), _run(3), _run(4)
    assert first.episodes == second.episodes
    for a, b in zip(first.policy.parameters(), second.policy.parameters(), strict=True):
        assert (a == b).all()
    assert first.episodes != other.episodes


def test_async_vector_env_gives_the_same_run_as_sync():
    sync, parallel = _run(5), _run(5, vectorization="async")
    assert isinstance(parallel.envs, gym.vector.AsyncVectorEnv)
    assert sync.episodes == parallel.episodes
    parallel.close()


def test_next_step_autoreset_vector_env_counts_only_real_steps():
    envs = gym.make_vec(
        "CartPole-v1", num_envs=3, vectorization_mode="sync", vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP}
    )
    agent = PPO(envs, PPOConfig(num_steps=64, num_minibatches=2, seed=0))
    agent.learn(3_000, progress=False)
    finished = sum(length for _, _, length in agent.episodes)
    assert finished + agent.tracker.running_length.sum() == agent.global_step
    assert all(ret == length for _, ret, length in agent.episodes)  # CartPole pays 1 per real step
    assert agent.buffer.mask.min() == 0.0  # reset steps were masked out of the losses


def test_time_limit_truncation_bootstraps_from_the_final_observation():
    agent = PPO("Pendulum-v1", PPOConfig(num_envs=2, num_steps=200, num_minibatches=4, norm_obs=True))
    agent.learn(400, progress=False)
    buf = agent.buffer
    # Pendulum never terminates; its time limit cuts every episode at step 200
    assert buf.terminated.sum() == 0
    assert buf.has_final_value[-1].all() and not buf.has_final_value[:-1].any()
    assert buf.episode_end[-1].all()
    assert (buf.final_values[-1] != 0).all()


def test_stochastic_and_deterministic_evaluation_differ_before_training():
    agent = PPO("CartPole-v1", PPOConfig(seed=0, num_envs=1, num_steps=8, num_minibatches=1))
    deterministic, _ = agent.evaluate(5)
    stochastic, spread = agent.evaluate(5, deterministic=False)
    assert spread > 0 and (deterministic, 0.0) != (stochastic, spread)
    assert np.isfinite(deterministic)
