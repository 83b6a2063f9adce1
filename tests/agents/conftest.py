from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def stop_when_solved():
    """Factory of learn() callbacks that stop once the last 20 training returns average ``threshold``."""

    def make(threshold: float, window: int = 20):
        def callback(agent) -> bool:
            recent = [ret for _, ret, _ in agent.episodes[-window:]]
            return not (len(recent) == window and np.mean(recent) >= threshold)

        return callback

    return make


@pytest.fixture
def first_rollout_log_ratios():
    """One rollout of a fresh agent, re-scored by its policy before any step: (log ratios of real steps, buffer)."""

    def collect(agent):
        with torch.inference_mode():
            agent.collect_rollout()
        buf = agent.buffer
        n = buf.num_steps * buf.num_envs
        with torch.no_grad():
            logprob, _, _ = agent.policy.evaluate(
                buf.obs.reshape(n, *buf.obs.shape[2:]), buf.actions.reshape(n), buf.episode_ids().reshape(n)
            )
        return (logprob - buf.logprobs.reshape(n))[buf.mask.reshape(n) > 0], buf

    return collect
