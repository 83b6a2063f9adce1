"""Once every episode of a batch has ended, the env frees its KV caches until episodes start again."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from transformers import AutoModelForCausalLM

from textenv.decoding import DecodeState
from textenv.testing import SAMPLE_PROMPTS


def _episodes(model_dir, *, release: bool, monkeypatch):
    if not release:
        monkeypatch.setattr(DecodeState, "release", lambda self: None)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    envs = gym.make_vec("TextRLHF-v0", num_envs=3, model=model, prompts=list(SAMPLE_PROMPTS), max_new_tokens=3,
                        eos_token_id=[], kl_coef=0.5, autoreset_mode=AutoresetMode.DISABLED)
    engine = envs.unwrapped._engine
    with torch.no_grad():  # the policy moves away from its reference: both run forwards of their own
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    seen, held = [], []
    for seed in (0, 1):
        envs.reset(seed=seed)
        for _ in range(3):
            logprobs = envs.next_logprobs.clone()
            _, reward, terminated, truncated, _ = envs.step(logprobs.argmax(-1).numpy())
            seen.append((logprobs, reward))
        assert (terminated | truncated).all()
        held.append((engine.policy.cache, engine.ref.cache))
    after_end = envs.next_logprobs  # asked for once all ended: recomputed from the tokens
    return seen, held, after_end


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_caches_are_freed_when_every_episode_ended_and_results_do_not_change(arch, tiny_dir, llama_dir, monkeypatch):
    model_dir = tiny_dir if arch == "gpt2" else llama_dir
    kept, kept_caches, _ = _episodes(model_dir, release=False, monkeypatch=monkeypatch)
    monkeypatch.undo()
    freed, freed_caches, after_end = _episodes(model_dir, release=True, monkeypatch=monkeypatch)
    assert all(policy is not None and ref is not None for policy, ref in kept_caches)
    assert all(policy is None and ref is None for policy, ref in freed_caches)
    for (lp_a, r_a), (lp_b, r_b) in zip(kept, freed, strict=True):
        torch.testing.assert_close(lp_a, lp_b, atol=0, rtol=0)
        np.testing.assert_array_equal(r_a, r_b)
    assert after_end is not None and bool(torch.isfinite(after_end.amax(-1)).all())
