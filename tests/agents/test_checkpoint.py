"""Checkpoints: exact resumption, normalisation stats, atomic writes, clear errors on bad files."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from agents import PPO, PPOConfig
from agents.checkpoint import CheckpointError


def _config(**kwargs) -> PPOConfig:
    return PPOConfig(seed=2, num_envs=2, num_steps=64, num_minibatches=2, update_epochs=3, anneal_lr=True, **kwargs)


NORMALISED = {"norm_obs": True, "norm_reward": True}


@pytest.mark.parametrize("env_id,extra", [("CartPole-v1", {}), ("Pendulum-v1", NORMALISED)])
def test_load_then_learn_continues_the_same_run(tmp_path, env_id, extra):
    total, path = 1_024, tmp_path / "mid.pt"

    def save_halfway(agent: PPO) -> None:
        if agent.iteration == 4:
            agent.save(path)

    uninterrupted = PPO(env_id, _config(**extra)).learn(total, progress=False, callback=save_halfway)
    resumed = PPO.load(path)
    assert resumed.global_step == 512 and resumed.iteration == 4
    resumed.learn(total - resumed.global_step, progress=False)

    assert resumed.episodes == uninterrupted.episodes
    for a, b in zip(resumed.policy.parameters(), uninterrupted.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    np.testing.assert_array_equal(resumed.obs_normalizer.stats.mean, uninterrupted.obs_normalizer.stats.mean)
    assert resumed.optimizer.param_groups[0]["lr"] == uninterrupted.optimizer.param_groups[0]["lr"]


def test_checkpoint_holds_normalisation_stats(tmp_path):
    agent = PPO("Pendulum-v1", _config(norm_obs=True, norm_reward=True)).learn(256, progress=False)
    agent.save(tmp_path / "pendulum.pt")
    loaded = PPO.load(tmp_path / "pendulum.pt")
    assert loaded.obs_normalizer.stats.count == agent.obs_normalizer.stats.count > 1
    np.testing.assert_array_equal(loaded.obs_normalizer.stats.var, agent.obs_normalizer.stats.var)
    assert loaded.reward_scaler.stats.var == agent.reward_scaler.stats.var != 1.0
    obs = np.array([0.3, -0.9, 1.2], dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict(obs), agent.predict(obs))


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r} does not exist")):
        PPO.load(path)


def test_corrupt_checkpoint_names_the_path(tmp_path):
    agent = PPO("CartPole-v1", _config())
    path = tmp_path / "cut.pt"
    agent.save(path)
    path.write_bytes(path.read_bytes()[:100])  # a copy cut off mid-way
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r} is corrupt or not a checkpoint")):
        PPO.load(path)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    agent = PPO("CartPole-v1", _config())
    path = tmp_path / "agent.pt"
    agent.save(path)
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        agent.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["agent.pt"]  # no temp file left behind
