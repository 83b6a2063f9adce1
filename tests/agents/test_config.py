"""PPOConfig validation, presets, and the rule that explicit fields beat the preset."""

from __future__ import annotations

import re

import numpy as np
import pytest

from agents import PPO, PPOConfig, available_presets
from agents.config import CHOICES, FIELD_RULES, check_field_name, field_names, load_preset, resolve_config


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
        ({"num_envs": 0}, "PPOConfig.num_envs=0 must be a positive integer; e.g. num_envs=8"),
        ({"num_steps": -5}, "PPOConfig.num_steps=-5 must be a positive integer; e.g. num_steps=128"),
        ({"num_minibatches": 0}, "PPOConfig.num_minibatches=0 must be a positive integer; e.g. num_minibatches=4"),
        ({"update_epochs": 0}, "PPOConfig.update_epochs=0 must be a positive integer; e.g. update_epochs=10"),
        (
            {"num_envs": 2, "num_steps": 4, "num_minibatches": 16},
            "PPOConfig.num_minibatches=16 is larger than the rollout (num_envs * num_steps = 8); "
            "lower num_minibatches or raise num_steps",
        ),
        ({"learning_rate": 0.0}, "PPOConfig.learning_rate=0.0 must be a finite number > 0; e.g. learning_rate=0.0003"),
        ({"learning_rate": "3e-4"},
         "PPOConfig.learning_rate='3e-4' must be a finite number > 0, not a str; e.g. learning_rate=0.0003"),
        ({"gamma": 1.5}, "PPOConfig.gamma=1.5 must be a number in [0, 1]; e.g. gamma=0.99"),
        ({"advantage": "td"}, "PPOConfig.advantage='td' is not one of 'gae', 'mc'; e.g. advantage='gae'"),
        ({"advantage": "gea"}, "PPOConfig.advantage='gea' is not one of 'gae', 'mc'; did you mean 'gae'?"),
        ({"policy_loss": "kl"},
         "PPOConfig.policy_loss='kl' is not one of 'clip', 'kl_penalty'; e.g. policy_loss='clip'"),
        ({"activation": 1}, "PPOConfig.activation=1 is not one of 'tanh', 'relu'; e.g. activation='tanh'"),
        ({"target_kl": 0}, "PPOConfig.target_kl=0 must be a finite number > 0, or None; e.g. target_kl=0.02"),
        ({"hidden_sizes": 64},
         "PPOConfig.hidden_sizes=64 must be a non-empty tuple of positive layer widths, not an int; "
         "e.g. hidden_sizes=(64, 64)"),
        ({"hidden_sizes": (64, 0)},
         "PPOConfig.hidden_sizes=(64, 0) must be a non-empty tuple of positive layer widths; "
         "e.g. hidden_sizes=(64, 64)"),
        ({"num_envs": True}, "PPOConfig.num_envs=True must be a positive integer, not a bool; e.g. num_envs=8"),
        ({"num_steps": 64.0}, "PPOConfig.num_steps=64.0 must be a positive integer, not a float; e.g. num_steps=128"),
        ({"norm_adv": 1}, "PPOConfig.norm_adv=1 must be True or False, not an int; e.g. norm_adv=True"),
        ({"seed": -1}, "PPOConfig.seed=-1 must be an integer in [0, 2**32); e.g. seed=0"),
        ({"max_nonfinite_steps": -1},
         "PPOConfig.max_nonfinite_steps=-1 must be an integer >= 0; e.g. max_nonfinite_steps=3"),
        (
            {"num_envs": 2, "num_steps": 4, "num_minibatches": 8},
            "PPOConfig.num_minibatches=8 with norm_adv=True gives minibatches of one transition "
            "(num_envs * num_steps = 8), whose normalised advantage is always 0; lower num_minibatches, "
            "raise num_steps, or set norm_adv=False",
        ),
        (
            {"critic_model": "path/to/rm"},
            "PPOConfig.critic_model='path/to/rm' is only used with critic='separate' (critic='shared'); "
            "set critic='separate' or leave critic_model=None",
        ),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PPOConfig(**kwargs)


def test_every_field_has_a_type_and_range_rule():
    assert set(FIELD_RULES) == set(field_names())


NUMERIC = [name for name, (kind, _) in FIELD_RULES.items()
           if kind not in ("bool", "choice", "widths", "path_or_none", "texts", "modules", "lora_config")]
INTEGER = [name for name, (kind, _) in FIELD_RULES.items()
           if kind in ("positive_int", "count", "seed", "positive_int_or_none")]
BOOLEAN = [name for name, (kind, _) in FIELD_RULES.items() if kind == "bool"]


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -float("inf"), "1", [1]])
def test_no_numeric_field_takes_a_non_finite_or_non_number(name, value):
    with pytest.raises(ValueError, match=f"^PPOConfig.{name}={re.escape(repr(value))} must be .*; e.g. {name}="):
        PPOConfig(**{name: value})


@pytest.mark.parametrize("name", INTEGER)
@pytest.mark.parametrize("value", [True, False, 2.0])
def test_integer_fields_refuse_bools_and_floats(name, value):
    with pytest.raises(ValueError, match=f"^PPOConfig.{name}={value!r} must be .*, not a {type(value).__name__}; "):
        PPOConfig(**{name: value})


@pytest.mark.parametrize("name", BOOLEAN)
@pytest.mark.parametrize("value", [1, "False", None])
def test_bool_fields_refuse_other_types(name, value):
    with pytest.raises(ValueError, match=f"^PPOConfig.{name}={re.escape(repr(value))} must be True or False"):
        PPOConfig(**{name: value})


@pytest.mark.parametrize("name", list(CHOICES))
@pytest.mark.parametrize("value", [1, None, ("gae",)])
def test_choice_fields_refuse_other_types(name, value):
    with pytest.raises(ValueError, match=f"^PPOConfig.{name}={re.escape(repr(value))} is not one of"):
        PPOConfig(**{name: value})


def test_numpy_scalars_and_lists_are_accepted_as_plain_values():
    config = PPOConfig(num_envs=np.int64(4), learning_rate=np.float32(1e-3), hidden_sizes=[np.int64(8), 8])
    assert type(config.num_envs) is int and type(config.learning_rate) is float
    assert config.hidden_sizes == (8, 8)


@pytest.mark.parametrize(
    "key,suggestion",
    [("lr", "learning_rate"), ("n_steps", "num_steps"), ("n_epochs", "update_epochs"),
     ("num_ppo_epochs", "update_epochs"), ("clip_range", "clip_coef"), ("cliprange", "clip_coef"),
     ("n_envs", "num_envs"), ("num_mini_batches", "num_minibatches"), ("normalize_advantage", "norm_adv"),
     ("Learning_Rate", "learning_rate"), ("learning-rate", "learning_rate"), ("ent_coeff", "ent_coef")],
)
def test_names_from_other_libraries_get_ours(key, suggestion):
    message = f"unknown PPOConfig key {key!r}; did you mean {suggestion!r}?"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PPOConfig(**{key: 1})
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_field_name(key)


@pytest.mark.parametrize(
    "key,message",
    [
        ("batch_size", "unknown PPOConfig key 'batch_size'; did you mean 'num_minibatches'? (PPOConfig counts "
                       "minibatches instead of sizing them: minibatch size = num_envs * num_steps // num_minibatches)"),
        ("cliprange_value", "unknown PPOConfig key 'cliprange_value'; did you mean 'vf_clip_coef'? "
                            "(and clip_vloss=True, which turns value clipping on)"),
        ("vf_clip", "unknown PPOConfig key 'vf_clip'; did you mean 'vf_clip_coef'? "
                    "(and clip_vloss=True, which turns value clipping on)"),
        ("kl_coef", "unknown PPOConfig key 'kl_coef'; it is a setting of the env (TextRLHF-v0: 'kl_coef'), not of "
                    "PPO: pass env_kwargs={'kl_coef': ...} (CLI: --env-kwargs kl_coef=...)"),
        ("total_timesteps", "unknown PPOConfig key 'total_timesteps'; the run length is not a PPOConfig field: "
                            "pass learn(total_timesteps) (CLI: --total-timesteps)"),
    ],
)
def test_keys_that_mean_something_else_say_what(key, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PPOConfig(**{key: 1})


def test_setting_a_field_after_construction_is_checked_at_once():
    config = PPOConfig()
    with pytest.raises(ValueError, match=re.escape("unknown PPOConfig key 'lr'; did you mean 'learning_rate'?")):
        config.lr = 1e-3
    with pytest.raises(ValueError, match=re.escape("PPOConfig.gamma=2 must be a number in [0, 1]")):
        config.gamma = 2
    assert not hasattr(config, "lr") and config.gamma == 0.99
    config.hidden_sizes = [32]
    assert config.hidden_sizes == (32,)


def test_combinations_set_one_by_one_are_checked_when_the_agent_resolves_them():
    config = PPOConfig(num_envs=2, num_steps=4, num_minibatches=2)
    config.num_minibatches = 8  # fine alone; with the rollout of 8, minibatches of one
    with pytest.raises(ValueError, match="gives minibatches of one transition"):
        resolve_config("MountainCar-v0", config)
    with pytest.raises(ValueError, match="gives minibatches of one transition"):
        resolve_config("CartPole-v1", config)


def test_from_dict_needs_a_dict():
    with pytest.raises(ValueError, match=re.escape("PPOConfig.from_dict([1]) needs a dict of fields")):
        PPOConfig.from_dict([1])


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


def test_the_text_preset_raises_the_learning_rate_and_checkpoints_for_lora_unless_they_are_set():
    full = resolve_config("TextRLHF-v0", None)
    lora = resolve_config("TextRLHF-v0", PPOConfig(lora_r=16))
    chosen = resolve_config("TextRLHF-v0", PPOConfig(lora_r=16, learning_rate=3e-5, gradient_checkpointing=False))
    assert full.learning_rate == load_preset("TextRLHF-v0")["config"]["learning_rate"]
    assert lora.learning_rate == load_preset("TextRLHF-v0")["with_lora"]["learning_rate"] > full.learning_rate
    assert chosen.learning_rate == 3e-5
    # LoRA's point is memory: activation checkpointing is on by default with it, and off without it
    assert lora.gradient_checkpointing and not full.gradient_checkpointing
    assert not chosen.gradient_checkpointing
    # for a third of the blocks LoRA keeps the activations: they take less time than they cost in memory
    assert lora.gradient_checkpointing_fraction == 0.67 and full.gradient_checkpointing_fraction == 1.0
    halved = resolve_config("TextRLHF-v0", PPOConfig(lora_r=16, gradient_checkpointing_fraction=0.5))
    assert halved.gradient_checkpointing and halved.gradient_checkpointing_fraction == 0.5
