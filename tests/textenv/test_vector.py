"""The native vector env: equal to Gymnasium's SyncVectorEnv of single envs, batched, SAME_STEP autoreset."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from transformers import AutoModelForCausalLM

import textenv
from textenv import TextRLHFEnv, TextRLHFVectorEnv
from textenv.decoding import DecodeState
from textenv.testing import SAMPLE_PROMPTS

PROMPTS = list(SAMPLE_PROMPTS)


def random_actions(rng: np.random.Generator, num_envs: int, vocab: int, eos: int) -> np.ndarray:
    """Random tokens with an EOS now and then, so episodes end at different steps in different rows."""
    actions = rng.integers(4, vocab, size=num_envs)
    actions[rng.random(num_envs) < 0.2] = eos
    return actions


def perturb(model: torch.nn.Module, seed: int) -> None:
    """An in-place change of every weight, as an optimiser step makes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def assert_same_step(vec_out, sync_out) -> None:
    (obs_v, rew_v, term_v, trunc_v, info_v), (obs_s, rew_s, term_s, trunc_s, info_s) = vec_out, sync_out
    assert data_equivalence(obs_v, obs_s, exact=True)
    np.testing.assert_allclose(rew_v, rew_s, atol=1e-5, rtol=0)
    assert rew_v.dtype == rew_s.dtype and term_v.dtype == term_s.dtype
    assert term_v.tolist() == term_s.tolist() and trunc_v.tolist() == trunc_s.tolist()
    assert info_v.keys() == info_s.keys()
    assert data_equivalence(info_v, info_s), (info_v, info_s)


@pytest.mark.parametrize(("arch", "splice"), [("gpt2", True), ("llama", True), ("gpt2", False)])
def test_vector_env_equals_sync_vector_env_of_single_envs(arch, splice, tiny_dir, llama_dir, monkeypatch):
    if not splice:  # the path for caches whose layers cannot be spliced (sliding windows): rebuild them
        monkeypatch.setattr(DecodeState, "_splicable", lambda self: False)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir if arch == "gpt2" else llama_dir)
    kwargs = dict(prompts=PROMPTS, max_new_tokens=5, kl_coef=0.5, kl_estimator="k3")
    num_envs = 4
    vec = gym.make_vec("TextRLHF-v0", num_envs=num_envs, model=model, **kwargs)
    sync = SyncVectorEnv([lambda: TextRLHFEnv(model, **kwargs) for _ in range(num_envs)],
                         autoreset_mode=AutoresetMode.SAME_STEP)
    assert isinstance(vec, TextRLHFVectorEnv) and vec.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
    out_v, out_s = vec.reset(seed=11), sync.reset(seed=11)
    assert data_equivalence(out_v, out_s, exact=True)
    rng = np.random.default_rng(0)
    eos = vec.tokenizer.eos_token_id
    finished = 0
    for step in range(30):
        if step == 8:
            perturb(model, seed=1)  # mid-episode: caches are rebuilt, the reference gets its own forward
        actions = random_actions(rng, num_envs, vec.single_action_space.n, eos)
        out_v, out_s = vec.step(actions), sync.step(actions)
        assert_same_step(out_v, out_s)
        finished += int(out_v[2].sum())
        torch.testing.assert_close(
            vec.next_logprobs, torch.stack([e.unwrapped.next_logprobs for e in sync.envs]), atol=1e-5, rtol=0
        )
        # rows that restart are spliced in, and columns no row needs are dropped (a prompt opening
        # shared by the rows that started together may sit in front of rows that do not use it)
        longest_prompt = max(len(vec.tokenizer(p)["input_ids"]) for p in PROMPTS)
        assert vec.unwrapped._engine.policy.mask.shape[1] <= 2 * longest_prompt + 5
    assert finished > 10 and np.abs(out_v[1]).max() > 0


def test_final_obs_and_info_follow_gymnasium_same_step_autoreset(tiny_dir):
    vec = gym.make_vec("TextRLHF-v0", num_envs=3, model=tiny_dir, prompts=PROMPTS, max_new_tokens=3)
    obs, info = vec.reset(seed=0)
    eos = vec.tokenizer.eos_token_id
    obs, reward, terminated, truncated, info = vec.step(np.array([eos, 9, 9]))
    assert terminated.tolist() == [True, False, False] and not truncated.any()
    assert info["_final_obs"].tolist() == [True, False, False]
    assert info["final_obs"][0]["input_ids"][vec.max_prompt_tokens] == eos
    assert info["final_info"]["eos"][0] and info["final_info"]["_score"].tolist() == [True, False, False]
    assert info["_kl"].tolist() == [False, True, True] and info["_prompt"].tolist() == [True, False, False]
    # the returned observation is already the next episode's first one
    assert obs["attention_mask"][0, vec.max_prompt_tokens:].sum() == 0
    assert obs["input_ids"][1, vec.max_prompt_tokens] == 9


def test_disabled_autoreset_rows_wait_and_the_others_match_single_envs(tiny_dir):
    """Finished rows idle until reset(reset_mask); running rows compute what a lone env computes."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    kwargs = dict(prompts=PROMPTS, max_new_tokens=6, kl_coef=0.5, kl_estimator="k3")
    vec = gym.make_vec("TextRLHF-v0", num_envs=3, model=model, autoreset_mode=AutoresetMode.DISABLED, **kwargs)
    singles = [TextRLHFEnv(model, **kwargs) for _ in range(3)]
    assert vec.metadata["autoreset_mode"] is AutoresetMode.DISABLED
    vec.reset(seed=4)
    for i, env in enumerate(singles):
        env.reset(seed=4 + i)
    perturb(model, seed=2)  # the reference runs its own forwards, so rewards are not all zero
    eos = vec.tokenizer.eos_token_id
    plan = [[eos, 7, 7], [9, 8, 7], [9, eos, 7], [9, 9, 7]]  # row 0 ends at step 0, row 1 at step 2
    finished = np.zeros(3, dtype=bool)
    last_obs = None
    for actions in plan:
        obs, reward, terminated, truncated, info = vec.step(np.array(actions))
        for i, env in enumerate(singles):
            if finished[i]:  # idle: same observation, no reward, still terminated, no info
                assert reward[i] == 0.0 and terminated[i] and not info["_kl"][i]
                assert data_equivalence(obs["input_ids"][i], last_obs[i], exact=True)
                continue
            single_obs, single_reward, single_term, _, single_info = env.step(actions[i])
            assert data_equivalence(obs["input_ids"][i], single_obs["input_ids"], exact=True)
            assert reward[i] == pytest.approx(single_reward, abs=1e-5) and terminated[i] == single_term
            assert info["kl"][i] == pytest.approx(single_info["kl"], abs=1e-5)
            if single_term:
                assert info["_score"][i] and "final_obs" not in info
        finished |= terminated
        last_obs = obs["input_ids"].copy()
    assert finished.tolist() == [True, True, False]
    obs, info = vec.reset(options={"reset_mask": np.array([True, True, False])})
    assert obs["attention_mask"][:2, vec.max_prompt_tokens:].sum() == 0
    assert obs["attention_mask"][2, vec.max_prompt_tokens:].sum() == 4  # row 2 carries on
    assert info["_prompt"].tolist() == [True, True, False]
    with pytest.raises(textenv.ConfigError, match="reset_mask"):
        vec.reset(options={"reset_mask": np.zeros(3, dtype=bool)})
    with pytest.raises(textenv.ConfigError, match="autoreset_mode"):
        gym.make_vec("TextRLHF-v0", num_envs=2, model=model, autoreset_mode=AutoresetMode.NEXT_STEP, **kwargs)


def test_one_batched_forward_per_step_and_one_reward_call_per_batch(tiny_dir, boost):
    calls = []

    def count(prompts, completions, **kw):
        calls.append(len(completions))
        return [0.0] * len(completions)

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    vec = gym.make_vec("TextRLHF-v0", num_envs=5, model=model, reward=count, prompts=PROMPTS, max_new_tokens=4)
    forwards = {"policy": 0, "ref": 0}
    model.base_model.register_forward_pre_hook(lambda *a: forwards.__setitem__("policy", forwards["policy"] + 1))
    vec.ref_model.base_model.register_forward_pre_hook(lambda *a: forwards.__setitem__("ref", forwards["ref"] + 1))
    vec.reset(seed=0)
    # one prompt forward (two when the prompts share an opening: it runs once, for one row); the
    # reference borrows the identical policy's outputs
    assert forwards["policy"] in (1, 2) and forwards["ref"] == 0
    boost(model, 9)
    rng = np.random.default_rng(1)
    for _ in range(12):
        before = dict(forwards)
        _, _, terminated, _, _ = vec.step(random_actions(rng, 5, vec.single_action_space.n, 1))
        calls_now = calls[len(calls) - int(terminated.any()):]
        assert calls_now == ([int(terminated.sum())] if terminated.any() else [])
        new = {k: forwards[k] - before[k] for k in forwards}
        if before["ref"] > 0:  # after the first step both models run once per step (+1 or 2 for new prompts)
            prompt_forwards = new["policy"] - int(not terminated.all())
            assert prompt_forwards in ((1, 2) if terminated.any() else (0,))
            assert new["ref"] == new["policy"]
    assert forwards["ref"] > 0


def test_vector_env_exposes_the_agent_interface(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    vec = gym.make_vec("TextRLHF-v0", num_envs=3, model=model, prompts=PROMPTS, temperature=0.9)
    assert vec.model is model and vec.spec.kwargs["model"].value is model
    assert vec.ref_model is not model and not vec.ref_model.training
    assert (vec.temperature, vec.max_new_tokens, vec.max_prompt_tokens, vec.kl_coef) == (0.9, 32, 64, 0.05)
    assert vec.next_logprobs is None and vec.current_obs is None
    obs, _ = vec.reset(seed=0)
    assert data_equivalence(vec.current_obs, obs, exact=True)
    assert vec.next_logprobs.shape == (3, model.config.vocab_size) and vec.next_logprobs.dtype == torch.float32
    assert vec.next_hidden.shape == (3, model.config.n_embd)
    assert vec.action_space.shape == (3,) and vec.observation_space["input_ids"].shape == (3, 96)
    assert len(vec.render()) == 3


def test_vector_reset_seeds_sub_envs_like_sync_vector_env(tiny_dir):
    vec = gym.make_vec("TextRLHF-v0", num_envs=4, model=tiny_dir, prompts=PROMPTS)
    _, info_a = vec.reset(seed=5)
    _, info_b = vec.reset(seed=[5, 6, 7, 8])
    _, info_c = vec.reset(seed=5)
    assert info_a["prompt_index"].tolist() == info_b["prompt_index"].tolist() == info_c["prompt_index"].tolist()
    singles = [TextRLHFEnv(tiny_dir, prompts=PROMPTS).reset(seed=5 + i)[1]["prompt_index"] for i in range(4)]
    assert info_a["prompt_index"].tolist() == singles


def test_rollouts_inside_and_outside_inference_mode_mix(tiny_dir, boost):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    vec = gym.make_vec("TextRLHF-v0", num_envs=3, model=model, prompts=PROMPTS, max_new_tokens=3)
    rng = np.random.default_rng(0)
    with torch.inference_mode():  # how an agent collects rollouts
        vec.reset(seed=0)
        for _ in range(4):
            vec.step(random_actions(rng, 3, vec.single_action_space.n, 1))
    boost(model, 9)  # the update, outside inference mode
    for _ in range(4):
        *_, info = vec.step(random_actions(rng, 3, vec.single_action_space.n, 1))
    with torch.inference_mode():
        *_, info = vec.step(random_actions(rng, 3, vec.single_action_space.n, 1))
    assert np.isfinite(vec.next_logprobs.numpy()).all()


def test_next_token_cache_is_the_envs_forward_at_the_current_states(tiny_dir):
    envs = gym.make_vec("TextRLHF-v0", num_envs=3, model=tiny_dir, max_new_tokens=4)
    assert envs.next_token_cache() is None  # before the first reset
    obs, _ = envs.reset(seed=0)
    cache = envs.next_token_cache()
    ids, mask = torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"])
    assert cache.matches(ids, mask) and torch.equal(cache.logprobs, envs.next_logprobs)
    assert cache.hidden.shape[0] == 3
    obs, *_ = envs.step(np.array([5, 6, 7]))
    assert not cache.matches(torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"]))
    fresh = envs.next_token_cache()
    assert fresh.matches(torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"]))


def test_prompt_shards_split_the_prompt_set_and_new_episodes_stay_in_their_shard(tiny_dir):
    envs = gym.make_vec("TextRLHF-v0", num_envs=4, model=tiny_dir, prompts=list(SAMPLE_PROMPTS), max_new_tokens=2)
    single = gym.make("TextRLHF-v0", model=tiny_dir, prompts=list(SAMPLE_PROMPTS), max_new_tokens=2).unwrapped
    count = len(SAMPLE_PROMPTS)
    assert envs.prompt_shard == tuple(range(count))  # unsharded: every prompt
    shards = []
    for rank in range(3):
        envs.shard_prompts(rank, 3)
        shards.append(envs.prompt_shard)
        seen = set()
        for seed in range(10):  # reset() and same-step autoresets draw from the shard only
            envs.reset(seed=seed)
            for _ in range(3):
                envs.step(np.zeros(4, dtype=np.int64))
            seen |= {envs.prompts.index(text.split("\n")[0]) for text in envs.render()}
        assert seen == set(shards[-1])
        single.shard_prompts(rank, 3)
        assert {single.reset(seed=s)[1]["prompt_index"] for s in range(20)} <= set(shards[-1])
    assert sorted(k for shard in shards for k in shard) == list(range(count))  # disjoint, and all of them
    envs.shard_prompts(0, count + 1)  # fewer prompts than ranks: each keeps them all
    assert envs.prompt_shard == tuple(range(count))
    envs.reset(seed=0, options={"prompt_index": [count - 1] * 4})  # an explicit prompt is always allowed
    for bad in ((2, 2), (-1, 2), (0, 0), (0.5, 2)):
        with pytest.raises(textenv.ConfigError, match="shard_prompts"):
            envs.shard_prompts(*bad)
