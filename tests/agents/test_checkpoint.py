"""Checkpoints: exact resumption, normalisation stats, atomic writes, clear errors on bad files and wrong envs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenv  # noqa: F401  registers TextRLHF-v0
from agents import PPO, PPOConfig, SpaceMismatchError
from agents.checkpoint import CheckpointError, describe
from textenv.testing import SAMPLE_PROMPTS, make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


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


# ---------------------------------------------------------------------- loading onto the wrong env, broken files
def test_loading_onto_an_env_with_other_spaces_names_both(tmp_path):
    PPO("CartPole-v1", _config()).save(tmp_path / "cartpole.pt")
    acrobot = gym.make("Acrobot-v1")
    message = (f"checkpoint {str(tmp_path / 'cartpole.pt')!r} was trained with observation space "
               f"{gym.make('CartPole-v1').observation_space}, but the env it is loaded onto has observation space "
               f"{acrobot.observation_space}; load it onto the env it was trained on (same id and env_kwargs)")
    with pytest.raises(SpaceMismatchError, match=f"^{re.escape(message)}$"):
        PPO.load(tmp_path / "cartpole.pt", env=acrobot)
    three_actions = gym.make("CartPole-v1")
    three_actions.action_space = gym.spaces.Discrete(3)
    with pytest.raises(ValueError, match=re.escape("action space Discrete(2), but the env it is loaded onto has "
                                                   "action space Discrete(3)")):
        PPO.load(tmp_path / "cartpole.pt", env=three_actions)


@pytest.mark.parametrize("part", ["optimizer", "policy", "progress", "env_state"])
def test_a_checkpoint_missing_a_part_names_it_and_the_path(tmp_path, part):
    path = tmp_path / "agent.pt"
    PPO("CartPole-v1", _config()).save(path)
    state = torch.load(path, weights_only=False)
    del state[part]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"^{re.escape(f'checkpoint {str(path)!r} has no {part!r} part')}"):
        PPO.load(path)


def test_a_part_that_does_not_fit_is_named(tmp_path):
    path = tmp_path / "agent.pt"
    PPO("CartPole-v1", _config()).save(path)
    state = torch.load(path, weights_only=False)
    state["progress"] = {"global_step": 3}
    torch.save(state, path)
    message = f"checkpoint {str(path)!r}: its 'progress' part does not fit this agent (KeyError: 'iteration')"
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}"):
        PPO.load(path)


def test_directories_are_refused_with_a_clear_message(tmp_path):
    agent = PPO("CartPole-v1", _config())
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint path {str(tmp_path)!r} is a directory")):
        agent.save(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(tmp_path)!r} is a directory")):
        PPO.load(tmp_path)


# ---------------------------------------------------------------------- temp files of killed saves
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_save_removes_temp_files_of_dead_writers_only(tmp_path):
    from agents.checkpoint import _HOST

    path = tmp_path / "agent.pt"
    dead = tmp_path / f".agent.pt.{_HOST}.{_dead_pid()}.abcd1234.tmp"
    alive = tmp_path / f".agent.pt.{_HOST}.{os.getpid()}.efgh5678.tmp"  # a save in flight in a live process
    other_host = tmp_path / f".agent.pt.elsewhere.{_dead_pid()}.ijkl9012.tmp"  # its pid means nothing here
    other_file = tmp_path / f".other.pt.{_HOST}.{_dead_pid()}.mnop3456.tmp"
    for leftover in (dead, alive, other_host, other_file):
        leftover.write_bytes(b"half a checkpoint")
    PPO("CartPole-v1", _config()).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, alive.name, other_host.name,
                                                                 other_file.name])


def test_the_temp_file_of_a_save_killed_mid_write_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "agent.pt"
    writer = (
        "import sys, time, torch\n"
        "from agents.checkpoint import save_checkpoint\n"
        "def stuck(obj, handle):\n"
        "    handle.write(b'half a checkpoint'); handle.flush(); print('writing', flush=True); time.sleep(60)\n"
        "torch.save = stuck\n"
        "save_checkpoint({'x': 1}, sys.argv[1])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == b"writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and f".{proc.pid}." in leftovers[0] and not path.exists()
    agent = PPO("CartPole-v1", _config())
    agent.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["agent.pt"]
    assert PPO.load(path).global_step == 0


# ---------------------------------------------------------------------- what a checkpoint holds
def test_describe_lists_every_part_with_its_size_and_contents(tmp_path):
    path = tmp_path / "agent.pt"
    PPO("CartPole-v1", _config()).save(path)
    parts = describe(path)
    assert {"policy", "optimizer", "rng", "progress", "env_state", "spaces", "config"} <= set(parts)
    assert all(isinstance(p["bytes"], int) and p["bytes"] > 0 for p in parts.values())
    assert parts["optimizer"]["holds"].startswith("Adam state") and "parameters" in parts["policy"]["holds"]
    assert parts["reference"]["holds"] == "no reference model"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_lm"), seed=0, n_layer=2, n_embd=32)


def _text_envs(model_dir):
    return gym.make_vec("TextRLHF-v0", num_envs=4, model=str(model_dir), reward="length",
                        prompts=list(SAMPLE_PROMPTS), max_new_tokens=4)


def test_a_text_checkpoint_holds_weights_and_adam_state_but_no_reference(tiny_lm, tmp_path):
    envs = _text_envs(tiny_lm)
    agent = PPO(envs, PPOConfig(num_steps=4, num_minibatches=1, seed=0)).learn(16, progress=False)
    path = tmp_path / "text.pt"
    agent.save(path)
    parts = describe(path)
    weight_bytes = 4 * sum(p.numel() for p in agent.policy.parameters())
    # the policy is the actor (the env's model) plus a value head, stored once; Adam keeps two moments
    assert weight_bytes <= parts["policy"]["bytes"] < 1.1 * weight_bytes + 20_000
    assert 2 * weight_bytes <= parts["optimizer"]["bytes"] < 2.1 * weight_bytes + 20_000
    assert path.stat().st_size < 3.2 * weight_bytes + 100_000
    assert parts["reference"]["holds"].startswith("not stored: the env rebuilds its frozen KL reference")
    state = torch.load(path, weights_only=False)
    assert all(key.startswith(("model.", "value_head.")) for key in state["policy"])  # no envs, no reference


def test_a_text_checkpoint_refuses_an_env_with_another_starting_model(tiny_lm, tmp_path_factory, tmp_path):
    other = make_tiny_model_dir(tmp_path_factory.mktemp("other_lm"), seed=1, n_layer=2, n_embd=32)
    agent = PPO(_text_envs(tiny_lm), PPOConfig(num_steps=4, num_minibatches=1, seed=0))
    agent.save(tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match=r"was trained against a KL reference with weights sha256:\w+, but the "
                                              r"env's reference has sha256:\w+; the reference is not stored"):
        PPO.load(tmp_path / "text.pt", env=_text_envs(other))
