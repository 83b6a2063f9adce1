"""PPOConfig validation, presets, and the rule that explicit fields beat the preset."""

from __future__ import annotations

import re

import pytest

from agents import PPO, PPOConfig, available_presets
from agents.config import load_preset, resolve_config


def test_presets_exist_for_the_classic_control_tasks():
    assert {"CartPole-v1", "Acrobot-v1", "Pendulum-v1"} <= set(available_presets())


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "Pendulum-v1"])
def test_preset_is_used_when_no_config_is_given(env_id):
    preset = load_preset(env_id)["config"]
    resolved = resolve_config(env_id, None)
    for key, value in preset.items():
        expected = tuple(value) if key == "hidden_sizes" else value
        assert getattr(resolved, key) == expected


def test_explicit_fields_override_the_preset_and_others_come_from_it():
    preset = load_preset("CartPole-v1")["config"]
    resolved = resolve_config("CartPole-v1", PPOConfig(seed=7, learning_rate=0.123))
    assert (resolved.seed, resolved.learning_rate) == (7, 0.123)
    assert resolved.num_steps == preset["num_steps"]


def test_a_field_set_to_the_default_still_overrides_the_preset():
    preset_steps = load_preset("CartPole-v1")["config"]["num_steps"]
    default_steps = PPOConfig().num_steps
    assert preset_steps != default_steps
    assert resolve_config("CartPole-v1", PPOConfig(num_steps=default_steps)).num_steps == default_steps


def test_a_field_assigned_after_construction_overrides_the_preset():
    config = PPOConfig()
    config.gamma = 0.5
    assert resolve_config("CartPole-v1", config).gamma == 0.5


def test_resolving_never_writes_into_the_users_config():
    config = PPOConfig(seed=3)
    before = config.to_dict()
    resolve_config("CartPole-v1", config)
    assert config.to_dict() == before


def test_unknown_env_without_preset_uses_defaults():
    assert resolve_config("MountainCar-v0", None) == PPOConfig()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_envs": 0}, "PPOConfig.num_envs=0 must be a positive integer"),
        ({"num_steps": -5}, "PPOConfig.num_steps=-5 must be a positive integer"),
        ({"num_minibatches": 0}, "PPOConfig.num_minibatches=0 must be a positive integer"),
        ({"update_epochs": 0}, "PPOConfig.update_epochs=0 must be a positive integer"),
        (
            {"num_envs": 2, "num_steps": 4, "num_minibatches": 16},
            "PPOConfig.num_minibatches=16 is larger than the rollout (num_envs * num_steps = 8); "
            "lower num_minibatches or raise num_steps",
        ),
        ({"learning_rate": 0.0}, "PPOConfig.learning_rate=0.0 must be > 0"),
        ({"gamma": 1.5}, "PPOConfig.gamma=1.5 must lie in [0, 1]"),
        ({"advantage": "td"}, "PPOConfig.advantage='td' is not one of 'gae', 'mc'"),
        ({"policy_loss": "kl"}, "PPOConfig.policy_loss='kl' is not one of 'clip', 'kl_penalty'"),
        ({"target_kl": 0}, "PPOConfig.target_kl=0 must be > 0 or None"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PPOConfig(**kwargs)


def test_unknown_key_suggests_the_closest():
    message = "unknown PPOConfig key 'learning_rat'; did you mean 'learning_rate'?"
    with pytest.raises(ValueError, match=re.escape(message)):
        PPOConfig.from_dict({"learning_rat": 1e-3})


def test_config_round_trips_through_a_dict():
    config = PPOConfig(hidden_sizes=(32, 16), seed=4, advantage="mc")
    assert PPOConfig.from_dict(config.to_dict()) == config


def test_minibatch_larger_than_rollout_is_caught_for_a_passed_vector_env():
    import gymnasium as gym

    envs = gym.make_vec("CartPole-v1", num_envs=2)
    message = "num_minibatches=64 is larger than the rollout (num_envs * num_steps = 32)"
    with pytest.raises(ValueError, match=re.escape(message)):
        PPO(envs, PPOConfig(num_steps=16, num_minibatches=64))
