"""Memory options of the language-model policy: activation checkpointing changes memory, not results."""

from __future__ import annotations

import re

import gymnasium as gym
import pytest
import torch

import textenv  # noqa: F401  (registers TextRLHF-v0)
from agents import PPO, PPOConfig
from textenv.testing import ARCHITECTURES, SAMPLE_PROMPTS, make_tiny_model_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("gc_llama"), arch="llama", seed=0, n_layer=2, n_embd=32)


def _trained(model_dir, block_name="layers.0", **changes):
    envs = gym.make_vec("TextRLHF-v0", num_envs=4, model=str(model_dir), reward="length",
                        prompts=list(SAMPLE_PROMPTS), max_new_tokens=6)
    settings = {"num_steps": 6, "whole_episodes": True, "update_epochs": 2, "num_minibatches": 2,
                "learning_rate": 1e-3, "seed": 3}
    agent = PPO(envs, PPOConfig(**{**settings, **changes}))
    # transformers' checkpointing replays what is inside a block, the block's own hooks stay outside
    modules = dict(agent.policy.model.named_modules())
    block = next(m for name, m in modules.items() if name.endswith(block_name))
    calls: dict[str, int] = {"block": 0, "mlp": 0, "rollout": 0, "prefix block": 0, "prefix mlp": 0}

    def count(name):
        def hook(module, args, *_):
            if torch.is_inference_mode_enabled():
                calls["rollout"] += 1
            else:  # the prompt opening all rows share runs as one row
                calls[f"prefix {name}" if args[0].shape[0] == 1 else name] += 1
        return hook

    block.register_forward_hook(count("block"))
    # (a pre-hook: the replay stops as soon as the last saved tensor is back, before the mlp returns)
    block.mlp.register_forward_pre_hook(count("mlp"))
    agent.learn(2 * agent.config.batch_size, progress=False)
    return agent, calls


def _trainable(agent):
    return {name: p.detach().clone() for name, p in agent.policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora_r", [0, 4])
def test_checkpointing_recomputes_blocks_and_trains_the_same_weights(llama_dir, lora_r):
    plain, plain_calls = _trained(llama_dir, lora_r=lora_r, gradient_checkpointing=False)  # (LoRA's default: on)
    checkpointed, checkpointed_calls = _trained(llama_dir, lora_r=lora_r, gradient_checkpointing=True)
    # each update forward ran inside the block a second time, in the backward (the recomputation)
    assert plain_calls["mlp"] == plain_calls["block"] > 0
    assert checkpointed_calls["mlp"] == 2 * checkpointed_calls["block"] > 0
    # and the shared prompt opening was still computed once, as one row (not recomputed: it is small)
    assert checkpointed_calls["prefix block"] == checkpointed_calls["prefix mlp"] == plain_calls["prefix block"] > 0
    assert checkpointed_calls["rollout"] == plain_calls["rollout"] > 0  # rollouts untouched
    before, after = _trainable(plain), _trainable(checkpointed)
    assert before.keys() == after.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # and the policy stays in eval mode (no dropout) outside and after the update
    assert not any(m.training for m in checkpointed.policy.model.modules())


def test_a_fraction_of_the_blocks_is_recomputed_and_the_same_weights_trained(llama_dir):
    plain, _ = _trained(llama_dir, gradient_checkpointing=False)
    half = {"gradient_checkpointing": True, "gradient_checkpointing_fraction": 0.5}  # 1 of the 2 blocks
    first, first_calls = _trained(llama_dir, "layers.0", **half)
    _, second_calls = _trained(llama_dir, "layers.1", **half)
    assert first.policy.checkpointed == [first.policy.model.get_submodule("model.layers.0")]
    assert first_calls["mlp"] == 2 * first_calls["block"] > 0  # the first block replayed in the backward
    assert second_calls["mlp"] == second_calls["block"] > 0  # the second kept its activations
    before, after = _trainable(plain), _trainable(first)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("fraction", [0, 1.5, "half", None])
def test_a_checkpointed_share_outside_0_to_1_is_refused(fraction):
    with pytest.raises(ValueError, match=r"^PPOConfig.gradient_checkpointing_fraction=.* must be a number in \(0, 1\]"):
        PPOConfig(gradient_checkpointing=True, gradient_checkpointing_fraction=fraction)


def test_checkpointing_on_an_mlp_policy_is_refused():
    with pytest.raises(ValueError, match=re.escape("PPOConfig.gradient_checkpointing=True applies to language-model")):
        PPO("CartPole-v1", PPOConfig(gradient_checkpointing=True, num_envs=2))


def test_gradient_checkpointing_setting_is_checked():
    with pytest.raises(ValueError, match="^PPOConfig.gradient_checkpointing="):
        PPOConfig(gradient_checkpointing="yes")


def test_an_unknown_lora_config_key_names_the_setting():
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match=r"^PPOConfig.lora_config=.*not a valid peft.LoraConfig"):
        PPOConfig(lora_config={"rank": 8})


def test_adapter_dropout_stays_off_in_ppo(llama_dir):
    pytest.importorskip("peft")
    envs = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(llama_dir), reward="length",
                        prompts=list(SAMPLE_PROMPTS), max_new_tokens=4)
    agent = PPO(envs, PPOConfig(lora_r=4, lora_dropout=0.5, num_steps=4, whole_episodes=True, seed=0))
    dropouts = [m for name, m in agent.policy.model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)



@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpointing_trains_the_same_weights_in_every_model_family(tmp_path, arch):
    # the shared prompt opening is a read-only cache in checkpointed blocks: recomputing them must
    # neither append its keys twice nor lose them, whatever the family's attention code
    model_dir = make_tiny_model_dir(tmp_path / arch, arch=arch, seed=0, n_layer=2, n_embd=32)
    trained = []
    for checkpointing in (False, True):
        envs = gym.make_vec("TextRLHF-v0", num_envs=4, model=str(model_dir), reward="length",
                            prompts=list(SAMPLE_PROMPTS), max_new_tokens=6)
        agent = PPO(envs, PPOConfig(num_steps=6, whole_episodes=True, update_epochs=2, num_minibatches=2,
                                    learning_rate=1e-3, seed=3, gradient_checkpointing=checkpointing))
        agent.learn(2 * agent.config.batch_size, progress=False)
        trained.append(_trainable(agent))
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=1e-4, atol=1e-5, msg=name)
