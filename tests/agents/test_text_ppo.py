"""The same PPO on TextRLHF-v0 with a tiny language model: consistency, masking and learning."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import textenv  # noqa: F401  registers TextRLHF-v0
from agents import PPO, PPOConfig
from agents.lm_policy import LMActorCritic
from textenv.testing import SAMPLE_PROMPTS, make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_lm"), seed=0, n_layer=2, n_embd=32)


def _envs(model, reward, num_envs=4, **kwargs):
    return gym.make_vec(
        "TextRLHF-v0", num_envs=num_envs, model=model, reward=reward, prompts=list(SAMPLE_PROMPTS), **kwargs
    )


def _token_share(tokenizer, word):
    target = tokenizer.convert_tokens_to_ids(word)

    def share(prompts, completions, completion_ids=None, **kw):
        return [float(np.mean([t == target for t in ids])) if ids else 0.0 for ids in completion_ids]

    return share, target


def test_lm_policy_is_picked_and_trains_the_envs_own_model(tiny_lm):
    envs = _envs(str(tiny_lm), "length", max_new_tokens=4)
    agent = PPO(envs, PPOConfig(num_steps=4, num_minibatches=2, seed=0))
    assert isinstance(agent.policy, LMActorCritic)
    assert agent.policy.model is envs.model
    before = [p.detach().clone() for p in envs.model.parameters()]
    agent.learn(16, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, envs.model.parameters(), strict=True))


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_rollout_log_probs_and_values_match_a_fresh_forward(tiny_lm, critic):
    envs = _envs(str(tiny_lm), "length", max_new_tokens=5, temperature=0.7)
    agent = PPO(envs, PPOConfig(num_steps=12, num_minibatches=1, seed=0, critic=critic))
    with torch.no_grad():
        for p in agent.policy.value_head.parameters():
            p.normal_()
        agent.collect_rollout()
        buf, n = agent.buffer, agent.buffer.num_steps * agent.buffer.num_envs
        assert buf.episode_end.sum() >= 4  # several episodes, some spanning the rollout
        obs, actions = buf.obs.reshape(n, 2, -1), buf.actions.reshape(n)
        grouped = agent.policy.evaluate(obs, actions, buf.episode_ids().reshape(n))
        one_by_one = agent.policy.evaluate(obs, actions)
    torch.testing.assert_close(grouped[0], buf.logprobs.reshape(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped[2], buf.values.reshape(n), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_by_one[0], grouped[0], atol=1e-5, rtol=0)


def test_episodes_stay_whole_in_minibatches(tiny_lm):
    envs = _envs(str(tiny_lm), "length", max_new_tokens=3)
    agent = PPO(envs, PPOConfig(num_steps=6, num_minibatches=3, seed=0))
    with torch.no_grad():
        agent.collect_rollout()
    ids = agent.buffer.episode_ids().reshape(-1)
    groups = [set(b.episode_ids.tolist()) for b in agent.buffer.minibatches(3, torch.Generator(), by_episode=True)]
    assert sum(len(g) for g in groups) == len(set(ids.tolist()))  # no episode split across minibatches


def test_custom_reward_rises_with_bounded_kl(tiny_lm):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    share, target = _token_share(tokenizer, "great")
    envs = _envs(str(tiny_lm), share, num_envs=16, max_new_tokens=8, kl_coef=0.02, temperature=1.0)
    agent = PPO(envs, PPOConfig(num_steps=8, learning_rate=3e-3, update_epochs=4, num_minibatches=2,
                                gamma=1.0, gae_lambda=0.95, vf_coef=0.1, seed=0))
    start_probability = envs.next_logprobs[:, target].exp().mean().item()
    scores, kls = [], []
    for _ in range(24):
        agent.learn(16 * 8, progress=False)
        scores.append(agent.last_stats["objective/score"])
        kls.append(agent.last_stats["objective/kl"])
    assert start_probability < 0.03 and np.mean(scores[:3]) < 0.05
    assert np.mean(scores[-6:]) > max(0.15, 4 * np.mean(scores[:3]))  # several times the starting share
    # nats per 8-token completion; without the penalty this run drifts past 25 by now
    assert max(kls) < 20.0


def test_save_pretrained_writes_a_transformers_directory(tiny_lm, tmp_path):
    envs = _envs(str(tiny_lm), "length", max_new_tokens=3)
    agent = PPO(envs, PPOConfig(num_steps=3, num_minibatches=1, seed=0)).learn(12, progress=False)
    agent.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (name, a), b in zip(envs.model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "<eos>"


def test_inverse_cdf_sampling_follows_the_distribution():
    from agents.lm_policy import sample_tokens

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]])
    log_probs = probs.log().expand(20_000, -1, -1).reshape(-1, 4)
    tokens = sample_tokens(log_probs, torch.Generator().manual_seed(0)).reshape(20_000, 2)
    frequencies = torch.stack([torch.bincount(tokens[:, row], minlength=4) for row in range(2)]) / 20_000
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)
    assert (tokens[:, 0] != 1).all() and (tokens[:, 1] == 3).all()  # zero-probability tokens never drawn


def test_ptx_loss_pulls_the_model_towards_the_pretraining_texts(tiny_lm, tmp_path):
    texts = tmp_path / "pretrain.txt"
    texts.write_text("the sea is calm .\nthe sun is warm .\n")
    envs = _envs(str(tiny_lm), "length", max_new_tokens=4)
    agent = PPO(envs, PPOConfig(num_steps=4, num_minibatches=1, seed=0, learning_rate=3e-3,
                                ptx_coef=1.0, ptx_data=str(texts), ptx_batch_size=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = agent.policy.pretraining_loss(generator).item()
    agent.learn(16 * 8, progress=False)
    with torch.no_grad():
        after = agent.policy.pretraining_loss(torch.Generator().manual_seed(0)).item()
    assert "losses/ptx_loss" in agent.last_stats
    assert after < before - 0.5


def test_ptx_needs_data():
    with pytest.raises(ValueError, match="PPOConfig.ptx_coef=0.5 needs ptx_data"):
        PPOConfig(ptx_coef=0.5)


def test_tensorboard_gets_text_objectives_and_samples(tiny_lm, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    envs = _envs(str(tiny_lm), ["sentiment", "length"], max_new_tokens=4)
    agent = PPO(envs, PPOConfig(num_steps=8, num_minibatches=1, seed=0), logdir=tmp_path)
    agent.learn(64, progress=False)
    agent.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    expected = {"objective/score", "objective/kl", "objective/non_score_reward", "objective/completion_length",
                "objective/eos_fraction", "objective/score/sentiment", "objective/kl_per_token",
                "objective/rlhf_reward", "objective/score/length",
                "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/clipfrac", "charts/SPS"}
    assert expected <= set(events.Tags()["scalars"])
    assert "samples/text_summary" in events.Tags()["tensors"]


def test_resumed_text_run_equals_the_uninterrupted_one(tiny_lm, tmp_path):
    """Policy, critic, optimizer, KL controller, reward statistics, RNG and in-flight episodes."""
    path = tmp_path / "mid.pt"

    def make_envs():
        controller = textenv.AdaptiveKLController(init_kl_coef=0.05, target=1.0, horizon=100)
        return _envs(str(tiny_lm), "sentiment", max_new_tokens=5, kl_coef=controller)

    config = PPOConfig(num_steps=4, num_minibatches=2, seed=0, learning_rate=1e-3, norm_reward=True)

    def save_at_two(agent: PPO) -> None:
        if agent.iteration == 2:
            agent.save(path)

    uninterrupted = PPO(make_envs(), config).learn(16 * 4, progress=False, callback=save_at_two)
    resumed = PPO.load(path, env=make_envs())
    resumed.learn(16 * 4 - resumed.global_step, progress=False)

    assert resumed.episodes == uninterrupted.episodes
    for a, b in zip(resumed.policy.state_dict().values(), uninterrupted.policy.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert resumed.envs.kl_coef == pytest.approx(uninterrupted.envs.kl_coef)
    assert resumed.envs.kl_coef != 0.05  # the adaptive controller moved, and its state was restored
    assert resumed.reward_scaler.stats.var == pytest.approx(uninterrupted.reward_scaler.stats.var)


def test_loading_a_text_checkpoint_needs_the_env(tiny_lm, tmp_path):
    agent = PPO(_envs(str(tiny_lm), "length", max_new_tokens=3), PPOConfig(num_steps=3, num_minibatches=1))
    agent.save(tmp_path / "a.pt")
    with pytest.raises(ValueError, match="was trained on an env object, not an id; build the same env again"):
        PPO.load(tmp_path / "a.pt")


def test_env_sees_every_optimizer_step(tiny_lm):
    """Mid-episode weight changes must refresh the env's cached distribution (fused Adam included)."""
    envs = _envs(str(tiny_lm), "length", max_new_tokens=8)
    agent = PPO(envs, PPOConfig(num_steps=3, num_minibatches=1, seed=0, learning_rate=1e-2))
    agent.learn(12, progress=False)  # episodes of 8 tokens are still running after 3 steps
    obs = agent.policy.preprocess(envs.current_obs)
    ids, mask = obs[:, 0], obs[:, 1]
    last = torch.tensor([int(torch.nonzero(row)[-1]) for row in mask])
    with torch.no_grad():
        fresh, _ = agent.policy._heads(ids, mask, torch.arange(4), last)
    assert obs[:, 1, envs.max_prompt_tokens :].sum() > 0  # mid-episode
    torch.testing.assert_close(envs.next_logprobs, fresh, atol=1e-5, rtol=0)


def test_evaluate_and_predict_on_a_single_text_env(tiny_lm):
    envs = _envs(str(tiny_lm), "length", max_new_tokens=3)
    agent = PPO(envs, PPOConfig(num_steps=3, num_minibatches=1, seed=0))
    with pytest.raises(ValueError, match=r"cannot be rebuilt from its id alone; pass evaluate\(env=...\)"):
        agent.evaluate(2)
    env = gym.make("TextRLHF-v0", model=envs.model, reward="length", prompts=list(SAMPLE_PROMPTS), max_new_tokens=3)
    obs, _ = env.reset(seed=0)
    greedy = agent.predict(obs)
    assert greedy == int(env.unwrapped.next_logprobs.argmax())
    mean, _ = agent.evaluate(3, env=env)
    assert np.isfinite(mean)
