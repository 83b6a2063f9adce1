"""The update's token log-probs and entropies scored a slice of rows at a time: the same values and gradients."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import textenv  # noqa: F401  (registers TextRLHF-v0)
from agents import PPO, PPOConfig, sliced_scores
from agents.sliced_scores import can_slice, entropy_of, sliced_token_scores
from textenv.kl import token_logprobs
from textenv.lm_head import LogitHead
from textenv.testing import SAMPLE_PROMPTS, make_tiny_model_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("sliced_llama"), arch="llama", seed=0, n_layer=2, n_embd=32)


def _head(llama_dir, *, bias: bool, softcap: float | None, scale: float | None) -> LogitHead:
    head = LogitHead(AutoModelForCausalLM.from_pretrained(str(llama_dir)))
    vocab, width = head.output.weight.shape
    torch.manual_seed(0)
    head.output = nn.Linear(width, vocab, bias=bias)  # a fresh layer, with a bias where asked
    head.softcap, head.scale = softcap, scale
    return head


def _whole_batch(head, hidden, actions, sampling):
    log_probs = token_logprobs(head.logits(hidden), *sampling)
    truncated = sampling[1] > 0 or sampling[2] < 1.0
    return log_probs.gather(-1, actions[:, None]).squeeze(-1), entropy_of(log_probs, truncated)


def _gradients(head, hidden, score, weights):
    """Values and gradients (hidden, weight, bias) of sum(weights[0] * chosen + weights[1] * entropy)."""
    hidden = hidden.detach().clone().requires_grad_(True)
    params = [p for p in head.output.parameters()]
    for p in params:
        p.grad = None
    chosen, entropy = score(hidden)
    loss = (weights[0] * chosen).sum() + ((weights[1] * entropy).sum() if weights[1] is not None else 0.0)
    loss.backward()
    return chosen.detach(), entropy.detach(), hidden.grad, [p.grad.clone() for p in params]


@pytest.mark.parametrize("sampling", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.8, 5, 1.0), (1.0, 0, 0.9)])
@pytest.mark.parametrize("transform", [(False, None, None), (True, 3.0, 0.5)])
@pytest.mark.parametrize("entropy_in_loss", [False, True])
def test_sliced_scores_equal_the_whole_batch_values_and_gradients(
    llama_dir, monkeypatch, sampling, transform, entropy_in_loss
):
    bias, softcap, scale = transform
    head = _head(llama_dir, bias=bias, softcap=softcap, scale=scale)
    vocab, width = head.output.weight.shape
    monkeypatch.setattr(sliced_scores, "SLICE_ELEMENTS", 3 * vocab)  # 3 rows a slice: 11 rows make 4 slices
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(11, width, generator=generator)
    actions = torch.randint(0, vocab, (11,), generator=generator)
    if sampling[1] or sampling[2] < 1.0:  # a truncated policy only ever takes tokens it can sample
        with torch.no_grad():
            actions = token_logprobs(head.logits(hidden), *sampling).argmax(-1)
    weights = (torch.randn(11, generator=generator), torch.randn(11, generator=generator) if entropy_in_loss else None)
    expected = _gradients(head, hidden, lambda h: _whole_batch(head, h, actions, sampling), weights)
    got = _gradients(head, hidden, lambda h: sliced_token_scores(head, h, actions, sampling), weights)
    for want, have in zip(expected[:3] + tuple(expected[3]), got[:3] + tuple(got[3]), strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
    assert can_slice(head)


def test_sliced_scores_keep_bfloat16_hidden_states_bfloat16_in_the_gradient(llama_dir):
    head = _head(llama_dir, bias=False, softcap=None, scale=None)
    hidden = torch.randn(5, head.output.weight.shape[1], dtype=torch.bfloat16, requires_grad=True)
    actions = torch.zeros(5, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chosen, _ = sliced_token_scores(head, hidden, actions, (1.0, 0, 1.0))
    chosen.sum().backward()
    assert chosen.dtype == torch.float32  # the output layer ran at the weights' precision
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad.float()).all()
    assert head.output.weight.grad.dtype == torch.float32


def _trained_weights(model_dir, *, sliced: bool, **config: Any) -> dict[str, torch.Tensor]:
    envs = gym.make_vec("TextRLHF-v0", num_envs=4, model=str(model_dir), reward="length",
                        prompts=list(SAMPLE_PROMPTS), max_new_tokens=6, temperature=0.8)
    agent = PPO(envs, PPOConfig(num_steps=6, whole_episodes=True, update_epochs=2, num_minibatches=2,
                                learning_rate=1e-3, seed=4, gradient_checkpointing=True, **config))
    assert agent.policy.sliced_scores  # a plain linear output layer, memory options on: the sliced route
    agent.policy.sliced_scores = sliced
    agent.learn(2 * agent.config.batch_size, progress=False)
    return {name: p.detach().clone() for name, p in agent.policy.named_parameters()}


@pytest.mark.parametrize("config", [
    {"ent_coef": 0.0}, {"ent_coef": 0.01},
    # the tied output layer's .grad already holds a part (PPO-ptx's, an earlier chunk's): added to, not replaced
    {"ent_coef": 0.0, "gradient_accumulation_steps": 2, "ptx_coef": 0.5, "ptx_data": list(SAMPLE_PROMPTS)},
], ids=["no-entropy", "entropy", "accumulated-with-ptx"])
def test_an_update_trains_the_same_weights_with_and_without_slices(llama_dir, monkeypatch, config):
    monkeypatch.setattr(sliced_scores, "SLICE_ELEMENTS", 1)  # one row a slice
    whole = _trained_weights(llama_dir, sliced=False, **config)
    sliced = _trained_weights(llama_dir, sliced=True, **config)
    assert whole.keys() == sliced.keys()
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_tied_output_layer_gets_one_dense_gradient_the_lookups_only_their_rows(llama_dir):
    # the tiny Llama ties its output layer to the input embedding, as SmolLM2 does
    envs = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(llama_dir), reward="length",
                        prompts=list(SAMPLE_PROMPTS), max_new_tokens=4)
    agent = PPO(envs, PPOConfig(num_steps=4, whole_episodes=True, num_minibatches=1, update_epochs=1, seed=0,
                                gradient_checkpointing=True))
    weight = agent.policy.head.output.weight
    assert weight is agent.policy.head.trunk.get_input_embeddings().weight
    arrived = []  # what autograd itself brings to the weight: the lookups' part, summed
    handle = weight.register_hook(lambda grad: arrived.append(grad.layout))
    seen_grads = []
    original_step = agent.optimizer.step
    agent.optimizer.step = lambda: (seen_grads.append(weight.grad.layout), original_step())[1]
    agent.learn(agent.config.batch_size, progress=False)
    handle.remove()
    assert arrived and all(layout == torch.sparse_coo for layout in arrived)  # no second [vocab, width] tensor
    assert seen_grads and all(layout == torch.strided for layout in seen_grads)  # the optimizer's is dense
    assert not agent.policy.head.trunk.get_input_embeddings().sparse  # switched on for the update forward only


def test_an_adapted_output_layer_keeps_the_whole_batch_route(llama_dir):
    envs = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(llama_dir), reward="length",
                        prompts=list(SAMPLE_PROMPTS), max_new_tokens=4)
    agent = PPO(envs, PPOConfig(num_steps=4, whole_episodes=True, lora_r=2, lora_target_modules=["q_proj", "lm_head"],
                                seed=0, gradient_checkpointing=True))
    assert not agent.policy.sliced_scores  # peft's layer is not an nn.Linear: its gradient is peft's business
    agent.learn(agent.config.batch_size, progress=False)
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())


def test_without_memory_options_the_update_keeps_the_faster_whole_batch_route(llama_dir):
    # slicing recomputes the output layer in the backward (+7-10 % update time on SmolLM2): only
    # when activation checkpointing says that memory matters more than compute
    envs = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(llama_dir), reward="length",
                        prompts=list(SAMPLE_PROMPTS), max_new_tokens=4)
    assert not PPO(envs, PPOConfig(num_steps=4, whole_episodes=True, seed=0)).policy.sliced_scores
