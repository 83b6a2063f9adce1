"""LoRA through peft: only adapters and heads train, the KL reference is the base model with the
adapters off (no second copy of the weights), and the env and the PPO ratio still score one
distribution."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import textenv
from agents import PPO, PPOConfig
from textenv.adapters import AdapterReference
from textenv.testing import DEFAULT_VOCAB, SAMPLE_PROMPTS, make_tiny_model_dir

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("lora_llama"), arch="llama", seed=0, n_layer=2, n_embd=32)


def _envs(model_dir, reward="length", num_envs=4, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    return gym.make_vec("TextRLHF-v0", num_envs=num_envs, model=str(model_dir), reward=reward,
                        prompts=list(SAMPLE_PROMPTS), **kwargs)


def _config(**changes):
    settings = {"lora_r": 4, "lora_alpha": 8.0, "num_steps": 6, "whole_episodes": True, "update_epochs": 1,
                "num_minibatches": 1, "learning_rate": 1e-2, "gamma": 1.0, "seed": 0}
    return PPOConfig(**{**settings, **changes})


def _storages(*modules):
    return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}


def _nudge_adapters(agent):
    """Give the adapters non-zero B matrices, as training would: the policy now differs from the base."""
    with torch.no_grad():
        for name, p in agent.policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))


def test_only_adapters_and_the_value_head_train(llama_dir):
    agent = PPO(_envs(llama_dir), _config())
    trainable = [name for name, p in agent.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("value_head.") for name in trainable)
    assert any(name.startswith("value_head.") for name in trainable)
    optimized = {id(p) for group in agent.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in agent.policy.parameters() if p.requires_grad}
    base = {name: p.clone() for name, p in agent.policy.model.named_parameters() if "lora_" not in name}
    agent.learn(2 * agent.config.batch_size, progress=False)
    after = dict(agent.policy.model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in base.items())  # base weights frozen


def test_the_reference_is_the_base_model_with_no_copy_of_the_weights(llama_dir):
    envs = _envs(llama_dir)
    copy_before = envs.ref_model
    agent = PPO(envs, _config())
    assert isinstance(envs.ref_model, AdapterReference) and envs.ref_model is not copy_before
    assert list(envs.ref_model.parameters()) == []
    # every weight reachable from env and agent lives in one storage: the policy's own
    assert _storages(agent.policy, envs.ref_model, envs.model) == _storages(agent.policy)
    # and the process cache let go of the frozen copy the env had loaded
    assert all(v is not copy_before for v in textenv.models._REFERENCES.values())


def test_ratio_is_one_and_the_kl_zero_before_the_first_step(llama_dir, first_rollout_log_ratios):
    agent = PPO(_envs(llama_dir, temperature=0.9), _config())
    log_ratio, buf = first_rollout_log_ratios(agent)
    assert log_ratio.abs().max() < 1e-5
    assert buf.rewards[buf.mask > 0].abs().max() > 0  # the length score, with exactly 0 KL beside it
    buf.compute_advantages(torch.zeros(buf.num_envs), gamma=1.0, gae_lambda=0.95, estimator="gae")
    stats = agent.update()
    assert stats["losses/clipfrac"] == 0.0
    assert stats["losses/approx_kl"] < 1e-9


def test_env_kl_is_policy_minus_base_once_the_adapters_moved(llama_dir):
    envs = _envs(llama_dir, num_envs=2, temperature=1.0)
    agent = PPO(envs, _config(num_envs=2))
    obs, _ = envs.reset(seed=0)
    _nudge_adapters(agent)
    policy_lp = envs.next_logprobs.clone()  # recomputed: the env sees the adapters changed
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    mask = torch.as_tensor(obs["attention_mask"][0]).bool()
    ids = torch.as_tensor(obs["input_ids"][0])[mask][None]
    with torch.no_grad():
        expected_policy = torch.log_softmax(envs.model(input_ids=ids).logits[0, -1].float(), -1)
        expected_ref = torch.log_softmax(base(input_ids=ids).logits[0, -1].float(), -1)
    torch.testing.assert_close(policy_lp[0], expected_policy, atol=1e-5, rtol=0)
    assert (expected_policy - expected_ref).abs().max() > 1e-3  # the adapters really changed the policy
    action = int(torch.argmax(expected_policy - expected_ref))
    _, reward, _, _, info = envs.step(np.array([action, action]))
    kl = float(expected_policy[action] - expected_ref[action])
    assert reward[0] == pytest.approx(-float(envs.kl_coef) * kl, abs=1e-5)


@pytest.mark.parametrize(("top_k", "targets"), [(0, "all-linear"), (5, ("q_proj", "v_proj", "lm_head"))])
def test_one_mixed_adapter_forward_scores_what_two_forwards_score(llama_dir, top_k, targets):
    """Policy and base rows in one peft mixed batch give the distributions of two separate forwards,
    across an early episode end and the restart spliced into the running batch."""
    runs = []
    for mixed in (True, False):
        # every other word ends an episode: episodes end at different steps, restarts are spliced in
        ends = list(range(4, 4 + len(DEFAULT_VOCAB), 2))
        envs = _envs(llama_dir, num_envs=3, temperature=1.0, top_k=top_k, max_new_tokens=5, eos_token_id=ends)
        agent = PPO(envs, _config(num_envs=3, lora_target_modules=targets))
        envs.use_lora_reference(agent.policy.adapters, mixed_batches=mixed)
        torch.manual_seed(1)
        _nudge_adapters(agent)
        envs.reset(seed=0)
        rng = np.random.default_rng(0)
        steps, ended = [], []
        for _ in range(12):
            logprobs = envs.next_logprobs.clone()
            actions = (logprobs.numpy() + rng.gumbel(size=logprobs.shape)).argmax(-1)
            _, reward, terminated, truncated, info = envs.step(actions)
            ended.append(int((terminated | truncated).sum()))
            # rows that autoreset this step have no token info
            scored = info.get("_ref_logprob", np.zeros(3, dtype=bool))
            steps.append((logprobs, reward, np.where(scored, info.get("ref_logprob", 0.0), np.nan), actions))
        runs.append(steps)
    assert type(envs.unwrapped._engine.ref).__name__ == "DecodeState"  # the second run: two forwards
    for (lp_a, r_a, ref_a, act_a), (lp_b, r_b, ref_b, act_b) in zip(*runs, strict=True):
        np.testing.assert_array_equal(act_a, act_b)
        torch.testing.assert_close(lp_a, lp_b, atol=1e-5, rtol=0)
        np.testing.assert_allclose(ref_a, ref_b, atol=1e-5, rtol=0)  # NaN where not scored, in both
        np.testing.assert_allclose(r_a, r_b, atol=1e-5, rtol=0)
    kls = np.concatenate([s[0].numpy()[np.arange(3), s[3]] - s[2] for s in runs[0]])
    assert np.nanmax(np.abs(kls)) > 1e-3  # the adapters moved: policy and reference rows really differ
    assert any(0 < n < 3 for n in ended)  # some rows ended while others ran on: restarts were spliced in


def test_lora_run_raises_a_custom_reward_with_bounded_kl(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    target = tokenizer.convert_tokens_to_ids("great")

    def share(prompts, completions, completion_ids=None, **kw):
        return [float(np.mean([t == target for t in ids])) if ids else 0.0 for ids in completion_ids]

    envs = _envs(llama_dir, reward=share, num_envs=16, max_new_tokens=8, kl_coef=0.02, temperature=1.0)
    # a tiny random model's frozen output layer bounds how far adapters on the blocks alone can move
    # one token's logit (its rows are near zero), so here the output layer gets an adapter too
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    agent = PPO(envs, _config(lora_r=8, lora_alpha=16.0, lora_target_modules=targets, num_steps=8,
                              learning_rate=1e-2, update_epochs=4, num_minibatches=2, vf_coef=0.1))
    scores, kls = [], []
    for _ in range(14):
        agent.learn(1, progress=False)  # one rollout of 16 whole episodes, then one update
        scores.append(agent.last_stats["objective/score"])
        kls.append(agent.last_stats["objective/kl"])
    assert np.mean(scores[:3]) < 0.05
    assert np.mean(scores[-4:]) > max(0.2, 5 * np.mean(scores[:3]))
    assert max(kls) < 18.0  # nats per 8-token completion


def test_adapter_checkpoint_resumes_exactly(llama_dir, tmp_path):
    path = tmp_path / "lora.pt"
    config = _config(num_minibatches=2, update_epochs=2)

    def save_at_two(agent):
        if agent.iteration == 2:
            agent.save(path)

    total = 4 * config.batch_size
    uninterrupted = PPO(_envs(llama_dir), config).learn(total, progress=False, callback=save_at_two)
    resumed = PPO.load(path, env=_envs(llama_dir))
    assert isinstance(resumed.envs.ref_model, AdapterReference)
    resumed.learn(total - resumed.global_step, progress=False)
    assert resumed.episodes == uninterrupted.episodes
    for (name, a), b in zip(resumed.policy.state_dict().items(), uninterrupted.policy.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_adapters_save_in_peft_format_and_merged_as_a_plain_model(llama_dir, tmp_path):
    envs = _envs(llama_dir)
    agent = PPO(envs, _config()).learn(12, progress=False)
    _nudge_adapters(agent)
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    with torch.no_grad():
        trained = torch.log_softmax(envs.model(input_ids=ids).logits.float(), -1)

    agent.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    agent.save_pretrained(tmp_path / "merged", merged=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(torch.log_softmax(reloaded(input_ids=ids).logits.float(), -1), trained,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.log_softmax(plain(input_ids=ids).logits.float(), -1), trained,
                                   atol=1e-5, rtol=0)
    # merging worked on a copy: the agent still trains its adapters
    assert any("lora_" in name for name, p in agent.policy.named_parameters() if p.requires_grad)
    env = gym.make("TextRLHF-v0", model=str(tmp_path / "merged"), reward="length", max_new_tokens=2)
    env.reset(seed=0)


def test_a_separate_critic_gets_adapters_of_its_own(llama_dir):
    agent = PPO(_envs(llama_dir), _config(critic="separate"))
    critic = [n for n, p in agent.policy.critic_trunk.named_parameters() if p.requires_grad]
    assert critic and all("lora_" in n for n in critic)
    agent.learn(agent.config.batch_size, progress=False)


@pytest.mark.parametrize(("changes", "message"), [
    ({"lora_r": -1}, "PPOConfig.lora_r=-1 must be an integer >= 0; e.g. lora_r=16"),
    ({"lora_dropout": 1.0}, "PPOConfig.lora_dropout=1.0 must be a number in [0, 1); e.g. lora_dropout=0.05"),
    ({"lora_target_modules": ()}, "PPOConfig.lora_target_modules=() must be 'all-linear' or a non-empty tuple"),
])
def test_lora_settings_are_checked(changes, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        PPOConfig(**changes)


def test_lora_on_an_mlp_policy_is_refused():
    with pytest.raises(ValueError, match="LoRA.*applies to language-model policies"):
        PPO("CartPole-v1", PPOConfig(lora_r=8, num_envs=2))


def test_a_ready_lora_config_and_the_cli_spelling(llama_dir):
    ready = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    agent = PPO(_envs(llama_dir), _config(lora_r=0, lora_config=ready))
    names = [n for n, p in agent.policy.model.named_parameters() if p.requires_grad]
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)
    restored = PPOConfig.from_dict(agent.config.to_dict())  # what a checkpoint stores
    assert restored.lora_config.r == 2 and set(restored.lora_config.target_modules) == {"q_proj", "v_proj"}


def test_cli_trains_with_lora_and_evaluates_on_the_adapter_reference(llama_dir, tmp_path, capsys):
    from agents.train import main

    code = main([
        "TextRLHF-v0", "--total-timesteps", "48", "--num-envs", "4", "--no-progress", "--eval-episodes", "2",
        "--save", str(tmp_path / "lora.pt"), "--config", "num_steps=6", "lora_r=4",
        "lora_target_modules=('q_proj','v_proj')",
        "--env-kwargs", f"model={llama_dir}", "reward=length", "max_new_tokens=6",
        f"prompts={list(SAMPLE_PROMPTS)!r}",
    ])
    out = capsys.readouterr().out
    assert code == 0 and "evaluation over 2 episodes" in out
    resumed = PPO.load(tmp_path / "lora.pt")
    assert resumed.config.lora_r == 4 and resumed.config.lora_target_modules == ("q_proj", "v_proj")
    assert isinstance(resumed.envs.ref_model, AdapterReference)
