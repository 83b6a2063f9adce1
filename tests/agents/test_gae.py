"""GAE and Monte-Carlo advantages against hand computations and a plain reference loop."""

from __future__ import annotations

import pytest
import torch

from agents.buffer import RolloutBuffer, compute_gae, compute_mc_advantages


def reference_gae(rewards, values, next_values, terminated, episode_end, gamma, lam):
    """Scalar loop written independently of the vectorised version."""
    steps, envs = len(rewards), len(rewards[0])
    advantages = [[0.0] * envs for _ in range(steps)]
    for env in range(envs):
        running = 0.0
        for t in reversed(range(steps)):
            bootstrap = 0.0 if terminated[t][env] else gamma * next_values[t][env]
            delta = rewards[t][env] + bootstrap - values[t][env]
            running = delta + (0.0 if episode_end[t][env] else gamma * lam * running)
            advantages[t][env] = running
    return advantages


def hand_example_buffer() -> RolloutBuffer:
    """Env 0 terminates at step 1; env 1 is truncated at step 1 with V(final obs) = 2."""
    buf = RolloutBuffer(3, 2, (1,), ())
    buf.rewards[:] = 1.0
    buf.values[:] = 0.5
    buf.terminated[1, 0] = 1.0
    buf.episode_end[1, :] = 1.0
    buf.final_values[1, 1] = 2.0
    buf.has_final_value[1, 1] = True
    return buf


def test_hand_computed_termination_and_truncation():
    buf = hand_example_buffer()
    buf.compute_advantages(torch.tensor([0.5, 0.5]), gamma=0.9, gae_lambda=0.8, estimator="gae")
    # env 0: t2 = 1 + .9*.5 - .5; t1 terminal = 1 - .5; t0 = .95 + .9*.8*.5
    # env 1: t1 bootstraps from the final obs: 1 + .9*2 - .5; t0 = .95 + .72*2.3
    expected = torch.tensor([[1.31, 2.606], [0.5, 2.3], [0.95, 0.95]])
    torch.testing.assert_close(buf.advantages, expected)
    torch.testing.assert_close(buf.returns, expected + 0.5)


def test_reward_only_on_last_step_with_constant_value():
    steps, gamma, lam, value = 5, 0.99, 0.95, 0.3
    rewards = torch.zeros(steps, 1)
    rewards[-1] = 1.0
    terminated = torch.zeros(steps, 1)
    terminated[-1] = 1.0
    values = torch.full((steps, 1), value)
    advantages, returns = compute_gae(
        rewards, values, values, terminated, terminated.clone(), gamma=gamma, gae_lambda=lam
    )
    # delta is gamma*v - v everywhere but at the end, where it is 1 - v
    deltas = [gamma * value - value] * (steps - 1) + [1.0 - value]
    for t in range(steps):
        expected = sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, steps))
        assert advantages[t, 0].item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(returns, advantages + values)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.98, 1.0)])
@pytest.mark.parametrize("with_truncation", [False, True])
def test_matches_reference_loop(gamma, lam, with_truncation):
    g = torch.Generator().manual_seed(0)
    steps, envs = 12, 3
    rewards, values = torch.randn(steps, envs, generator=g), torch.randn(steps, envs, generator=g)
    ends = torch.rand(steps, envs, generator=g) < 0.25
    truncated = ends & (torch.rand(steps, envs, generator=g) < 0.5) if with_truncation else torch.zeros_like(ends)
    terminated = (ends & ~truncated).float()
    next_values = torch.cat([values[1:], torch.randn(1, envs, generator=g)])
    next_values = torch.where(truncated, torch.randn(steps, envs, generator=g), next_values)
    advantages, _ = compute_gae(
        rewards, values, next_values, terminated, ends.float(), gamma=gamma, gae_lambda=lam
    )
    expected = reference_gae(
        rewards.tolist(), values.tolist(), next_values.tolist(), terminated.tolist(), ends.tolist(), gamma, lam
    )
    torch.testing.assert_close(advantages, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_mc_is_discounted_return_minus_value():
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [0.25], [1.0]])
    terminated = torch.tensor([[0.0], [0.0], [1.0]])
    next_values = torch.cat([values[1:], torch.zeros(1, 1)])
    advantages, returns = compute_mc_advantages(
        rewards, values, next_values, terminated, terminated.clone(), gamma=0.5
    )
    discounted = torch.tensor([[1 + 0.5 * 2 + 0.25 * 3], [2 + 0.5 * 3], [3.0]])
    torch.testing.assert_close(returns, discounted)
    torch.testing.assert_close(advantages, discounted - values)


def test_minibatches_cover_the_rollout_once():
    buf = RolloutBuffer(4, 3, (2,), ())
    buf.rewards = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    buf.advantages = buf.rewards.clone()
    seen = torch.cat([mb.advantages for mb in buf.minibatches(3, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(12))


@pytest.mark.parametrize("steps,envs,minibatches", [(5, 3, 4), (7, 1, 3), (4, 2, 4)])
def test_every_transition_is_in_exactly_one_minibatch_per_epoch(steps, envs, minibatches):
    buf = RolloutBuffer(steps, envs, (1,), ())
    buf.obs[:] = torch.arange(steps * envs, dtype=torch.float32).reshape(steps, envs, 1)
    batches = list(buf.minibatches(minibatches, torch.Generator().manual_seed(0)))
    seen = sorted(int(x) for b in batches for x in b.obs.flatten())
    assert seen == list(range(steps * envs))  # none dropped when the rollout does not divide
    sizes = [len(b.obs) for b in batches]
    assert len(sizes) == minibatches and max(sizes) - min(sizes) <= 1


def test_an_evenly_divided_rollout_keeps_its_slices():
    """Spreading a remainder must not change the minibatches of a rollout that divides (seeded runs stay put)."""
    buf = RolloutBuffer(4, 4, (1,), ())
    buf.obs[:] = torch.arange(16, dtype=torch.float32).reshape(4, 4, 1)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    batches = list(buf.minibatches(4, torch.Generator().manual_seed(3)))
    for k, batch in enumerate(batches):
        assert batch.obs.flatten().long().tolist() == order[4 * k : 4 * k + 4].tolist()
