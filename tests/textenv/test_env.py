"""TextRLHF-v0 single env: API conformance, the reward formula against an independent computation,
the policy identity contract, episode ends and determinism."""

from __future__ import annotations

import copy
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from transformers import AutoTokenizer

from textenv import AdaptiveKLController, Shared, TextRLHFEnv
from textenv.testing import SAMPLE_PROMPTS as PROMPTS


def sample(env, generator: torch.Generator) -> int:
    """Sample the next token from the env's held distribution, as an agent would."""
    return int(torch.multinomial(env.unwrapped.next_logprobs.exp(), 1, generator=generator))


def run_episode(env, seed: int, generator: torch.Generator, **reset_kwargs):
    obs, info = env.reset(seed=seed, **reset_kwargs)
    actions, rewards, infos = [], [], []
    terminated = False
    while not terminated:
        action = sample(env, generator)
        obs, reward, terminated, truncated, step_info = env.step(action)
        assert truncated is False
        actions.append(action)
        rewards.append(reward)
        infos.append(step_info)
    return info, actions, rewards, infos


def independent_terms(env, prompt_ids: list[int], actions: list[int]) -> dict[str, np.ndarray]:
    """One forward of policy and reference over the whole sequence, no cache: per-token estimates."""
    base = env.unwrapped
    ids = torch.tensor([prompt_ids + actions])
    with torch.no_grad():
        logp = torch.log_softmax(base.model.eval()(ids).logits[0].float() / base.temperature, -1)
        ref = torch.log_softmax(base.ref_model(ids).logits[0].float() / base.temperature, -1)
    steps = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(actions))
    lp, rp = logp[steps], ref[steps]
    a = torch.tensor(actions)
    chosen, ref_chosen = lp[torch.arange(len(a)), a], rp[torch.arange(len(a)), a]
    log_r = ref_chosen - chosen
    return {
        "logprob": chosen.numpy(),
        "ref_logprob": ref_chosen.numpy(),
        "k1": (chosen - ref_chosen).numpy(),
        "k3": (torch.exp(log_r) - 1 - log_r).numpy(),
        "full": (lp.exp() * (lp - rp)).sum(-1).numpy(),
    }


def test_gymnasium_check_env_passes_without_warnings(make_env):
    env = make_env()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


def test_stable_baselines3_check_env_passes(make_env):
    sb3_checker = pytest.importorskip("stable_baselines3.common.env_checker")
    env = make_env()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_checker.check_env(env.unwrapped, warn=True)
    assert [str(w.message) for w in caught] == []


def test_spaces_and_observation_layout(make_env):
    env = make_env(max_prompt_tokens=10, max_new_tokens=4)
    base = env.unwrapped
    assert env.action_space == gym.spaces.Discrete(base.model.config.vocab_size)
    assert env.observation_space["input_ids"].shape == (14,)
    obs, info = env.reset(seed=0, options={"prompt_index": 0})
    prompt_ids = base.tokenizer(PROMPTS[0])["input_ids"]
    assert info == {"prompt": PROMPTS[0], "prompt_index": 0}
    assert obs["input_ids"][10 - len(prompt_ids) : 10].tolist() == prompt_ids
    assert obs["attention_mask"].tolist() == [0] * (10 - len(prompt_ids)) + [1] * len(prompt_ids) + [0] * 4
    obs, *_ = env.step(7)
    assert obs["input_ids"][10] == 7 and obs["attention_mask"][10] == 1 and obs["attention_mask"][11] == 0
    assert obs in env.observation_space


def test_kl_penalty_is_exactly_zero_while_policy_equals_reference(make_env):
    env = make_env()
    _, _, rewards, infos = run_episode(env, 0, torch.Generator().manual_seed(0))
    score = infos[-1]["score"]
    assert rewards[:-1] == [0.0] * (len(rewards) - 1) and rewards[-1] == score
    assert all(i["kl_k1"] == i["kl_k3"] == i["kl_full"] == 0.0 for i in infos)


@pytest.mark.parametrize("estimator", ["k1", "k3", "full"])
def test_rewards_equal_an_independent_full_sequence_computation(make_env, policy, boost, estimator):
    def words(prompts, completions, **kw):
        return [0.5 * len(c.split()) for c in completions]

    boost(policy, 30)  # the policy now differs from its reference: the KL term is non-zero
    env = make_env(model=policy, reward=words, kl_coef=0.3, kl_estimator=estimator, reward_clip=2.0,
                   max_new_tokens=8, eos_token_id=[])
    boost(policy, 40, amount=2.0)
    info, actions, rewards, infos = run_episode(env, 1, torch.Generator().manual_seed(1))
    prompt_ids = env.unwrapped.tokenizer(info["prompt"])["input_ids"]
    terms = independent_terms(env, prompt_ids, actions)
    completion = env.unwrapped.tokenizer.decode(actions, skip_special_tokens=True)
    score = float(np.clip(0.5 * len(completion.split()), -2.0, 2.0))
    expected = -0.3 * terms[estimator]
    expected[-1] += score
    np.testing.assert_allclose(rewards, expected, atol=1e-5)
    assert np.abs(terms[estimator]).max() > 1e-3, "the test needs a policy that differs from its reference"
    for key in ("logprob", "ref_logprob"):
        np.testing.assert_allclose([i[key] for i in infos], terms[key], atol=1e-5)
    for key in ("k1", "k3", "full"):
        np.testing.assert_allclose([i[f"kl_{key}"] for i in infos], terms[key], atol=1e-5)
    assert [i["kl"] for i in infos] == [i[f"kl_{estimator}"] for i in infos]
    assert infos[-1]["score"] == pytest.approx(score) and infos[-1]["completion"] == completion


def test_kl_has_the_right_sign_after_the_policy_makes_a_token_more_likely(make_env, policy, boost):
    env = make_env(model=policy, kl_coef=0.1)
    env.reset(seed=0)
    boost(policy, 30)  # an in-place update, like an optimiser step, in the middle of the episode
    _, reward, _, _, info = env.step(30)
    assert info["logprob"] > info["ref_logprob"] + 0.5
    assert info["kl_k1"] == pytest.approx(info["logprob"] - info["ref_logprob"])
    assert reward == pytest.approx(-0.1 * info["kl_k1"]) and reward < 0
    assert info["kl_k3"] > 0 and info["kl_full"] > 0


def test_weights_written_through_data_are_noticed_at_the_next_reset(make_env, policy):
    env = make_env(model=policy, kl_coef=1.0)
    env.reset(seed=0)
    assert env.step(9)[4]["kl_k1"] == 0.0
    with torch.no_grad():  # `.data` writes bump no version counter
        policy.transformer.ln_f.bias.data += 0.5 * policy.lm_head.weight[9] / policy.lm_head.weight[9].norm()
    env.reset(seed=0)
    _, reward, _, _, info = env.step(9)
    assert info["kl_k1"] > 0.01 and reward == pytest.approx(-info["kl_k1"])


def test_next_logprobs_and_hidden_are_the_policy_at_the_current_state(make_env):
    env = make_env(temperature=0.5)
    base = env.unwrapped
    obs, _ = env.reset(seed=2)
    for action in (9, 31):
        logprobs, hidden = base.next_logprobs, base.next_hidden
        ids = torch.tensor(obs["input_ids"][obs["attention_mask"] == 1])[None]
        with torch.no_grad():
            out = base.model(ids, output_hidden_states=True)
        assert logprobs.dtype == torch.float32 and logprobs.shape == (base.model.config.vocab_size,)
        torch.testing.assert_close(logprobs, torch.log_softmax(out.logits[0, -1] / 0.5, -1), atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden, out.hidden_states[-1][0, -1], atol=1e-5, rtol=0)
        assert not logprobs.requires_grad
        obs, *_ = env.step(action)
        assert all((base.current_obs[k] == obs[k]).all() for k in obs)


def test_weights_changed_mid_episode_are_used_for_the_next_distribution(make_env, policy, boost):
    env = make_env(model=policy)
    env.reset(seed=0)
    obs, *_ = env.step(12)
    before = env.unwrapped.next_logprobs.clone()
    boost(policy, 12)
    after = env.unwrapped.next_logprobs
    assert after[12] > before[12] + 0.2
    ids = torch.tensor(obs["input_ids"][obs["attention_mask"] == 1])[None]
    with torch.no_grad():
        fresh = torch.log_softmax(policy(ids).logits[0, -1] / env.unwrapped.temperature, -1)
    torch.testing.assert_close(after, fresh, atol=1e-5, rtol=0)


def test_env_forwards_run_in_eval_mode_without_grad_and_keep_the_train_mode(make_env, policy):
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5  # with dropout active, two forwards would disagree
    policy.train()
    env = make_env(model=policy)
    env.reset(seed=0)
    obs, *_ = env.step(5)
    assert all(m.training for m in policy.modules())
    logprobs = env.unwrapped.next_logprobs
    ids = torch.tensor(obs["input_ids"][obs["attention_mask"] == 1])[None]
    policy.eval()
    with torch.no_grad():
        expected = torch.log_softmax(policy(ids).logits[0, -1] / env.unwrapped.temperature, -1)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
    assert not logprobs.requires_grad


def test_the_env_trains_the_module_it_was_given_through_spec_copies(make_env, policy, boost):
    env = make_env(model=policy)
    wrapped = gym.wrappers.RecordEpisodeStatistics(env)
    for _ in range(3):
        spec = wrapped.spec  # each read under wrappers deep-copies the kwargs
        assert isinstance(spec.kwargs["model"], Shared) and spec.kwargs["model"].value is policy
    assert copy.deepcopy(env.spec).kwargs["model"].value is policy
    assert env.unwrapped.model is policy
    recreated = env.spec.make()  # what check_env does
    assert recreated.unwrapped.model is policy
    assert recreated.unwrapped.ref_model is env.unwrapped.ref_model  # one frozen copy, not one per env
    env.reset(seed=0)
    boost(policy, 30)
    _, reward, *_ = env.step(30)
    assert reward < 0


def test_every_object_passed_to_gym_make_keeps_its_identity(make_env, policy, tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    controller = AdaptiveKLController(0.1, target=1.0, horizon=10)

    def brevity(prompts, completions, **kw):
        return [-len(c) / 100 for c in completions]

    env = make_env(model=policy, tokenizer=tokenizer, kl_coef=controller, reward=brevity)
    kwargs = copy.deepcopy(env.spec).kwargs
    assert kwargs["tokenizer"].value is tokenizer and kwargs["kl_coef"].value is controller
    assert kwargs["prompts"] == list(PROMPTS) and kwargs["max_new_tokens"] == 6  # plain data stays plain
    twin = env.spec.make().unwrapped
    assert (twin.model, twin.tokenizer, twin.kl_controller) == (policy, tokenizer, controller)
    assert twin.reward_fn is env.unwrapped.reward_fn and twin.reward_fn.names == ("brevity",)


def test_reference_is_a_frozen_copy_of_the_starting_weights(make_env, policy):
    env = make_env(model=policy)
    ref = env.unwrapped.ref_model
    assert ref is not policy and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    for p, q in zip(policy.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


def test_same_seed_same_prompts_actions_and_rewards(make_env, policy, boost):
    env_a, env_b = make_env(model=policy), make_env(model=policy)
    boost(policy, 20)  # a non-zero KL term, so rewards have something to differ in
    episodes = []
    for env in (env_a, env_b):
        first = run_episode(env, 7, torch.Generator().manual_seed(3))
        episodes.append([first, run_episode(env, None, torch.Generator().manual_seed(4))])
    assert episodes[0] == episodes[1]
    assert any(r != 0 for r in episodes[0][0][2][:-1])
    prompts = {run_episode(env_a, s, torch.Generator())[0]["prompt"] for s in range(12)}
    assert len(prompts) > 2  # the seed does choose the prompt


def test_episode_ends_at_eos_or_max_new_tokens_and_says_which(make_env):
    env = make_env(max_new_tokens=3)
    eos = env.unwrapped.tokenizer.eos_token_id
    env.reset(seed=0)
    _, _, terminated, truncated, info = env.step(eos)
    assert (terminated, truncated, info["eos"], info["truncated_at_max_tokens"]) == (True, False, True, False)
    assert info["completion"] == "" and info["completion_length"] == 1
    assert env.unwrapped.next_logprobs is None
    env.reset(seed=0)
    results = [env.step(9) for _ in range(3)]
    assert [r[2] for r in results] == [False, False, True] and not any(r[3] for r in results)
    assert results[-1][4]["eos"] is False and results[-1][4]["truncated_at_max_tokens"] is True
    assert "score" not in results[0][4]


def test_score_is_clipped_and_missing_eos_is_penalised(make_env):
    def big(prompts, completions, **kw):
        return [4.0] * len(completions)

    env = make_env(reward=big, reward_clip=5.0, missing_eos_penalty=3.0, max_new_tokens=2)
    env.reset(seed=0)
    env.step(9)
    *_, info = env.step(9)
    assert info["score"] == 1.0 and info["score/big"] == 4.0  # 4 - 3, no EOS
    env.reset(seed=0)
    _, reward, _, _, info = env.step(env.unwrapped.tokenizer.eos_token_id)
    assert info["score"] == 4.0 and reward == 4.0
    clipped = make_env(reward=big, reward_clip=1.5, max_new_tokens=1)
    clipped.reset(seed=0)
    assert clipped.step(9)[1] == 1.5


def test_adaptive_kl_controller_is_updated_from_finished_episodes(make_env, policy, boost):
    controller = AdaptiveKLController(0.2, target=0.1, horizon=4)
    env = make_env(model=policy, kl_coef=controller, max_new_tokens=2)
    boost(policy, 9)
    assert env.unwrapped.kl_controller is controller and env.unwrapped.kl_coef == 0.2
    env.reset(seed=0)
    _, r1, _, _, i1 = env.step(9)
    _, _, _, _, i2 = env.step(9)
    kl = i1["kl"] + i2["kl"]
    assert i2["episode_kl"] == pytest.approx(kl) and kl > 0.1 * 1.2  # above target: coefficient grows
    assert r1 == pytest.approx(-0.2 * i1["kl"]) and i2["kl_coef"] == 0.2
    assert env.unwrapped.kl_coef == pytest.approx(0.2 * (1 + 0.2 / 4))
    state = controller.state_dict()
    restored = AdaptiveKLController(1.0, target=5.0, horizon=9)
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_render_returns_prompt_and_completion(make_env):
    env = make_env(render_mode="ansi")
    env.reset(seed=0, options={"prompt_index": 3})
    for word in ("good", "coffee"):
        env.step(env.unwrapped.tokenizer.convert_tokens_to_ids(word))
    assert env.render() == "i like coffee\ngood coffee"


def test_chat_template_is_applied_unless_disabled(make_env, chat_dir):
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    for enabled, text in ((True, "user : i like coffee assistant :"), (False, "i like coffee")):
        env = make_env(model=chat_dir, chat_template=enabled)
        obs, _ = env.reset(seed=0, options={"prompt_index": 3})
        ids = obs["input_ids"][obs["attention_mask"] == 1].tolist()
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompts_from_txt_and_jsonl_files(make_env, tmp_path):
    (tmp_path / "p.txt").write_text("the sea is blue\n\ni like coffee\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "the sea is blue"}\n{"prompt": "i like coffee", "x": 1}\n')
    for name in ("p.txt", "p.jsonl"):
        env = make_env(prompts=tmp_path / name)
        assert env.unwrapped.prompts == ("the sea is blue", "i like coffee")


def test_builtin_prompt_set_has_the_benchmark_form():
    from textenv.prompts import builtin_prompts

    prompts = builtin_prompts()
    assert 280 <= len(prompts) <= 350 and len(set(prompts)) == len(prompts)
    assert all(p.startswith("Write one sentence about ") and p.endswith(".") for p in prompts)


def test_direct_construction_defaults_match_the_issue(tiny_dir):
    env = TextRLHFEnv(tiny_dir, prompts=PROMPTS)
    assert (env.max_new_tokens, env.temperature, env.kl_coef, env.config.reward_clip) == (32, 0.7, 0.05, 5.0)
    assert env.reward_fn.names == ("sentiment",) and env.config.kl_estimator == "k1"
