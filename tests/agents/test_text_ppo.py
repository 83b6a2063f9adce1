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


@pytest.mark.parametrize(
    ("critic", "sampling"),
    [("shared", {}), ("separate", {}), ("shared", {"top_k": 5}), ("shared", {"top_p": 0.8, "top_k": 20})],
)
def test_rollout_log_probs_and_values_match_a_fresh_forward(tiny_lm, critic, sampling):
    """The log-probs PPO stores, the env's KL uses and the update recomputes come from one distribution."""
    envs = _envs(str(tiny_lm), "length", max_new_tokens=5, temperature=0.7, **sampling)
    agent = PPO(envs, PPOConfig(num_steps=12, num_minibatches=1, seed=0, critic=critic, whole_episodes=False))
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
    assert grouped[1].isfinite().all()  # entropy of a truncated distribution too
    if sampling:  # only kept tokens are sampled, and the env scores them with the same log-probs
        kept = envs.next_logprobs.isfinite().sum(-1)
        assert (kept <= sampling.get("top_k", 10**6)).all() and (kept < envs.single_action_space.n).all()
        assert buf.logprobs.isfinite().all()


def test_episodes_stay_whole_in_minibatches(tiny_lm):
    envs = _envs(str(tiny_lm), "length", max_new_tokens=3)
    agent = PPO(envs, PPOConfig(num_steps=6, num_minibatches=3, seed=0, whole_episodes=False))
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
    for _ in range(16):
        agent.learn(1, progress=False)  # one rollout of 16 whole episodes, then one update
        scores.append(agent.last_stats["objective/score"])
        kls.append(agent.last_stats["objective/kl"])
    assert start_probability < 0.03 and np.mean(scores[:3]) < 0.05
    assert np.mean(scores[-4:]) > max(0.4, 10 * np.mean(scores[:3]))  # many times the starting share
    # nats per 8-token completion (the penalty's coefficient is small, so the KL may grow, but not run away)
    assert max(kls) < 18.0


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


@pytest.mark.parametrize("whole_episodes", [False, True])
def test_resumed_text_run_equals_the_uninterrupted_one(tiny_lm, tmp_path, whole_episodes):
    """Policy, critic, optimizer, KL controller, reward statistics, RNG and in-flight episodes."""
    path = tmp_path / "mid.pt"

    def make_envs():
        controller = textenv.AdaptiveKLController(init_kl_coef=0.05, target=1.0, horizon=100)
        return _envs(str(tiny_lm), "sentiment", max_new_tokens=5, kl_coef=controller)

    # whole_episodes=False: episodes of 5 tokens run on across rollouts of 4 steps, and across the save
    config = PPOConfig(num_steps=6 if whole_episodes else 4, num_minibatches=2, seed=0, learning_rate=1e-3,
                       norm_reward=True, whole_episodes=whole_episodes)

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
    agent = PPO(envs, PPOConfig(num_steps=3, num_minibatches=1, seed=0, learning_rate=1e-2, whole_episodes=False))
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


def test_whole_episode_rollouts_from_the_env_id(tiny_lm):
    """The text preset: one whole episode per env and rollout, finished envs wait (disabled autoreset)."""
    from gymnasium.vector import AutoresetMode

    vocab = AutoTokenizer.from_pretrained(tiny_lm).vocab_size
    # many end tokens, so that some episodes end early and then wait
    env_kwargs = dict(model=str(tiny_lm), reward="length", prompts=list(SAMPLE_PROMPTS), max_new_tokens=6,
                      eos_token_id=list(range(vocab // 8, vocab)))
    agent = PPO("TextRLHF-v0", PPOConfig(num_envs=5, num_steps=6, num_minibatches=1, seed=0), env_kwargs=env_kwargs)
    assert isinstance(agent.envs.unwrapped, textenv.TextRLHFVectorEnv) and agent.config.whole_episodes
    assert agent.envs.metadata["autoreset_mode"] is AutoresetMode.DISABLED
    steps = 0
    with torch.no_grad():
        for _ in range(2):
            agent.collect_rollout()
            buf = agent.buffer
            valid_steps = buf.mask.sum(0)
            steps += int(valid_steps.sum())
            ends = (buf.episode_end * buf.mask).sum(0)
            assert ends.tolist() == [1.0] * 5  # exactly one finished episode per env
            first_end = buf.episode_end.argmax(0)
            assert (valid_steps == first_end + 1).all()  # nothing after it is trained on
            assert valid_steps.min() < 6  # some ended early, and then waited
            n = buf.num_steps * buf.num_envs
            obs, actions, real = buf.obs.reshape(n, 2, -1), buf.actions.reshape(n), buf.mask.reshape(n) > 0
            logprob, _, _ = agent.policy.evaluate(obs, actions, buf.episode_ids().reshape(n))
            torch.testing.assert_close(logprob[real], buf.logprobs.reshape(n)[real], atol=1e-5, rtol=0)
            batches = buf.minibatches(1, torch.Generator(), by_episode=True)
            assert sum(len(torch.unique(b.episode_ids)) for b in batches) == 5  # waiting steps are never re-scored
    assert agent.global_step == steps and len(agent.episodes) == 10


def test_cli_trains_the_text_env_from_its_id(tiny_lm, tmp_path, capsys):
    from agents.train import main

    code = main([
        "TextRLHF-v0", "--total-timesteps", "48", "--num-envs", "4", "--no-progress", "--eval-episodes", "2",
        "--logdir", str(tmp_path / "runs"), "--save", str(tmp_path / "text.pt"),
        "--config", "num_steps=6", "learning_rate=1e-3",
        "--env-kwargs", f"model={tiny_lm}", "reward=length", "max_new_tokens=6", f"prompts={list(SAMPLE_PROMPTS)!r}",
    ])
    out = capsys.readouterr().out
    assert code == 0 and "evaluation over 2 episodes" in out
    resumed = PPO.load(tmp_path / "text.pt")  # plain env kwargs are saved: the env is rebuilt from them
    assert resumed.global_step >= 48 and resumed.envs.max_new_tokens == 6


def test_shared_prompt_opening_gives_the_same_loss_and_gradients(tiny_lm, monkeypatch):
    """The update runs a prompt opening that all episodes share once; it must not change the maths."""
    import textenv.prefix

    prompts = [f"Write one sentence about {topic}." for topic in ("the sea", "the cat", "music", "a garden")]
    envs = gym.make_vec("TextRLHF-v0", num_envs=6, model=str(tiny_lm), reward="length", prompts=prompts,
                        max_new_tokens=5)
    agent = PPO(envs, PPOConfig(num_steps=5, num_minibatches=1, seed=0))
    with torch.no_grad():
        agent.collect_rollout()
    buf, n = agent.buffer, agent.buffer.num_steps * agent.buffer.num_envs
    obs, actions, episodes = buf.obs.reshape(n, 2, -1), buf.actions.reshape(n), buf.episode_ids().reshape(n)
    assert textenv.prefix.split_shared_prefix(obs[:, 0], obs[:, 1]) is not None  # "write one sentence about"

    def loss_and_grads():
        agent.policy.zero_grad()
        logprob, _, value = agent.policy.evaluate(obs, actions, episodes)
        (logprob.sum() + value.sum()).backward()
        return logprob.detach(), [p.grad.clone() for p in agent.policy.model.parameters()]

    shared_logprob, shared_grads = loss_and_grads()
    monkeypatch.setattr(textenv.prefix, "MIN_SHARED_TOKENS", 10_000)  # every row runs whole
    plain_logprob, plain_grads = loss_and_grads()
    torch.testing.assert_close(shared_logprob, plain_logprob, atol=1e-5, rtol=0)
    for a, b in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradient_accumulation_gives_the_same_update(tiny_lm):
    def train(chunks: int) -> PPO:
        envs = _envs(str(tiny_lm), "length", num_envs=4, max_new_tokens=5)
        config = PPOConfig(num_steps=5, num_minibatches=1, update_epochs=2, seed=0, learning_rate=1e-3,
                           gradient_accumulation_steps=chunks)
        return PPO(envs, config).learn(1, progress=False)

    whole, split = train(1), train(3)
    for a, b in zip(whole.policy.parameters(), split.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for key in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl"):
        assert whole.last_stats[key] == pytest.approx(split.last_stats[key], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("disabled_autoreset", [True, False])
def test_sample_episodes_plays_without_training(tiny_lm, disabled_autoreset):
    if disabled_autoreset:
        env_kwargs = dict(model=str(tiny_lm), reward="length", prompts=list(SAMPLE_PROMPTS), max_new_tokens=4)
        agent = PPO("TextRLHF-v0", PPOConfig(num_envs=3, num_steps=4, seed=0), env_kwargs=env_kwargs)
    else:
        agent = PPO(_envs(str(tiny_lm), "length", num_envs=3, max_new_tokens=4), PPOConfig(num_steps=4, seed=0))
    weights = [p.detach().clone() for p in agent.policy.parameters()]
    episodes = agent.sample_episodes(5)
    assert len(episodes) == 5 and agent.global_step == 0 and agent.episodes == []
    for e in episodes:
        assert {"prompt", "completion", "score", "return", "length"} <= e.keys()
        assert e["prompt"] in SAMPLE_PROMPTS and 1 <= e["length"] <= 4
        assert e["return"] == pytest.approx(e["score"], abs=1e-6)  # the KL term is 0 before training
    assert all(torch.equal(a, b) for a, b in zip(weights, agent.policy.parameters(), strict=True))
    agent.learn(1, progress=False)  # training goes on from fresh episodes
    assert agent.global_step > 0


def test_entropy_bonus_with_top_k_keeps_gradients_finite(tiny_lm):
    envs = _envs(str(tiny_lm), "length", max_new_tokens=4, top_k=5)
    agent = PPO(envs, PPOConfig(num_steps=4, num_minibatches=1, seed=0, ent_coef=0.01, learning_rate=1e-3))
    agent.learn(1, progress=False)
    assert np.isfinite(agent.last_stats["losses/entropy"]) and agent.last_stats["losses/entropy"] > 0
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())
