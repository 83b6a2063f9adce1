"""Rollout storage and the advantage estimators, kept free of any env or policy knowledge."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    episode_end: torch.Tensor,
    *,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, computed backwards over a rollout.

    All inputs are ``[T, N]`` (steps x envs). ``next_values[t]`` is V of the state reached by step
    ``t``: the next stored value inside an episode, the final observation's value when the episode
    was cut by a time limit, anything when it terminated. ``terminated[t]`` (1.0/0.0) drops the
    bootstrap; ``episode_end[t]`` (terminated or truncated) stops the lambda-trace from leaking
    into the next episode. Returns ``(advantages, returns)`` with ``returns = advantages + values``.
    """
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * gae_lambda * (1.0 - episode_end[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def compute_mc_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    episode_end: torch.Tensor,
    *,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discounted Monte-Carlo returns minus the value baseline (REINFORCE with baseline).

    The return is bootstrapped only where the episode is cut before it ends (time limit or the
    end of the rollout); that is GAE with lambda = 1, which is exactly this estimator.
    """
    return compute_gae(
        rewards, values, next_values, terminated, episode_end, gamma=gamma, gae_lambda=1.0
    )


@dataclass
class Minibatch:
    """One shuffled slice of the flattened rollout."""

    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    episode_ids: torch.Tensor

    def subset(self, index: torch.Tensor) -> Minibatch:
        """The steps at ``index``."""
        return Minibatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def chunks(self, count: int, *, by_episode: bool) -> list[torch.Tensor]:
        """Split the steps into ``count`` index sets of about equal size (whole episodes if asked)."""
        n = self.mask.shape[0]
        if not by_episode:
            return [part for part in torch.arange(n, device=self.mask.device).chunk(count) if len(part)]
        episodes, owner = torch.unique(self.episode_ids, return_inverse=True)
        group = owner * count // len(episodes)
        return [index for g in range(count) if len(index := torch.nonzero(group == g).squeeze(-1))]


class RolloutBuffer:
    """Fixed-size ``[num_steps, num_envs]`` storage of one rollout.

    ``mask`` is 0 for transitions that must not be trained on (a vector env's reset step in
    Gymnasium's next-step autoreset mode, or padding on the text side); losses weight by it.
    ``final_values`` holds V(final observation) where an episode was truncated mid-rollout.
    """

    def __init__(
        self, num_steps: int, num_envs: int, obs_shape: tuple[int, ...], action_shape: tuple[int, ...],
        *, obs_dtype: torch.dtype = torch.float32, action_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_steps, num_envs)
        self.num_steps, self.num_envs, self.device = num_steps, num_envs, torch.device(device)
        zeros = {"device": self.device}
        self.obs = torch.zeros(shape + obs_shape, dtype=obs_dtype, **zeros)
        self.actions = torch.zeros(shape + action_shape, dtype=action_dtype, **zeros)
        self.logprobs = torch.zeros(shape, **zeros)
        self.rewards = torch.zeros(shape, **zeros)
        self.values = torch.zeros(shape, **zeros)
        self.terminated = torch.zeros(shape, **zeros)
        self.episode_end = torch.zeros(shape, **zeros)
        self.mask = torch.ones(shape, **zeros)
        self.final_values = torch.zeros(shape, **zeros)
        self.has_final_value = torch.zeros(shape, dtype=torch.bool, **zeros)
        self.advantages = torch.zeros(shape, **zeros)
        self.returns = torch.zeros(shape, **zeros)

    def add(self, step: int, *, obs: torch.Tensor, action: torch.Tensor, logprob: torch.Tensor, value: torch.Tensor,
            reward: Any, terminated: Any, episode_end: Any, valid: Any) -> None:
        """Store one vector-env step; ``valid`` False marks envs whose step must not be trained on."""
        self.obs[step], self.actions[step], self.logprobs[step], self.values[step] = obs, action, logprob, value
        self.rewards[step] = torch.as_tensor(reward, dtype=torch.float32)
        self.terminated[step] = torch.as_tensor(terminated, dtype=torch.float32)
        self.episode_end[step] = torch.as_tensor(episode_end, dtype=torch.float32)
        self.mask[step] = torch.as_tensor(valid, dtype=torch.float32)
        self.has_final_value[step] = False

    def add_final_values(self, step: int, envs: Any, values: torch.Tensor) -> None:
        """V(final observation) of the envs (a bool mask) whose episode a time limit cut at ``step``."""
        cut = torch.as_tensor(envs, device=self.device)
        self.final_values[step, cut] = values
        self.has_final_value[step] = cut

    def clear_from(self, step: int) -> None:
        """Mark steps ``step..`` unused (a rollout that ended early): masked, each its own empty episode."""
        for name in ("rewards", "values", "logprobs", "terminated", "mask", "final_values", "has_final_value"):
            getattr(self, name)[step:] = 0
        self.episode_end[step:] = 1.0

    def next_values(self, last_value: torch.Tensor) -> torch.Tensor:
        """V(s_{t+1}) for every step: the following stored value, or the final obs's value."""
        following = torch.cat([self.values[1:], last_value.reshape(1, -1)], dim=0)
        return torch.where(self.has_final_value, self.final_values, following)

    def compute_advantages(
        self, last_value: torch.Tensor, *, gamma: float, gae_lambda: float, estimator: str
    ) -> None:
        """Fill ``advantages`` and ``returns`` with the chosen estimator (``"gae"`` or ``"mc"``)."""
        args = (self.rewards, self.values, self.next_values(last_value), self.terminated, self.episode_end)
        if estimator == "mc":
            self.advantages, self.returns = compute_mc_advantages(*args, gamma=gamma)
        else:
            self.advantages, self.returns = compute_gae(*args, gamma=gamma, gae_lambda=gae_lambda)

    def episode_ids(self) -> torch.Tensor:
        """``[T, N]`` ids that are equal exactly for the transitions of one episode."""
        started_before = torch.cumsum(self.episode_end, dim=0) - self.episode_end
        column = torch.arange(self.num_envs, device=self.device).expand(self.num_steps, -1)
        return column * (self.num_steps + 1) + started_before.long()

    def minibatches(
        self, num_minibatches: int, generator: torch.Generator, *, by_episode: bool = False
    ) -> Iterator[Minibatch]:
        """Yield ``num_minibatches`` disjoint random slices that together cover the flattened rollout.

        ``by_episode`` keeps each episode's transitions together (shuffling whole episodes), so a
        sequence model can re-score an episode in one forward pass.
        """
        n = self.num_steps * self.num_envs
        episode_ids = self.episode_ids().reshape(n)
        if by_episode:
            # episodes with no trainable step (waiting envs, unused steps) would cost a forward for nothing
            trained = torch.zeros(int(episode_ids.max()) + 1, device=self.device)
            trained = trained.index_add_(0, episode_ids, self.mask.reshape(n)) > 0
            episodes = torch.unique(episode_ids)
            episodes = episodes[trained[episodes]]
            # the shuffle is drawn on the CPU generator, whatever the device: the same run everywhere
            shuffled = episodes[torch.randperm(len(episodes), generator=generator).to(self.device)]
            rank = torch.empty_like(episodes)
            rank[torch.searchsorted(episodes, shuffled)] = torch.arange(len(episodes), device=self.device)
            position = torch.searchsorted(episodes, episode_ids).clamp(max=len(episodes) - 1)
            group = torch.where(trained[episode_ids], rank[position] * num_minibatches // len(episodes), -1)
            for g in range(num_minibatches):
                index = torch.nonzero(group == g).squeeze(-1)
                if len(index):
                    yield self._slice(index, episode_ids)
            return
        # every transition once per epoch: sizes differ by at most one when n does not divide
        # (CleanRL's fixed-size slices would silently drop the last n % num_minibatches each epoch)
        order = torch.randperm(n, generator=generator).to(self.device)
        for index in torch.tensor_split(order, num_minibatches):
            if len(index):
                yield self._slice(index, episode_ids)

    def idle_minibatch(self) -> Minibatch:
        """A minibatch that trains on nothing (one stored step, masked out).

        In a data-parallel run a rank whose rollout split into fewer minibatches than another's
        steps with it, so that every rank takes part in each of DDP's gradient all-reduces.
        """
        n = self.num_steps * self.num_envs
        batch = self._slice(torch.zeros(1, dtype=torch.long, device=self.device), self.episode_ids().reshape(n))
        batch.mask = torch.zeros_like(batch.mask)
        return batch

    def _slice(self, index: torch.Tensor, episode_ids: torch.Tensor) -> Minibatch:
        n = self.num_steps * self.num_envs
        flat = {
            "obs": self.obs.reshape((n,) + self.obs.shape[2:]),
            "actions": self.actions.reshape((n,) + self.actions.shape[2:]),
            "logprobs": self.logprobs.reshape(n),
            "values": self.values.reshape(n),
            "advantages": self.advantages.reshape(n),
            "returns": self.returns.reshape(n),
            "mask": self.mask.reshape(n),
            "episode_ids": episode_ids,
        }
        return Minibatch(**{key: value[index] for key, value in flat.items()})
