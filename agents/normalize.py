"""Running statistics for observation normalisation and reward scaling (saved in checkpoints)."""

from __future__ import annotations

from typing import Any

import numpy as np


class RunningMeanStd:
    """Mean and variance of a stream of batches (Chan et al.'s parallel update), in float64."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape, dtype=np.float64)
        self.var = np.ones(shape, dtype=np.float64)
        self.count = 1e-4
        self._pending: list[np.ndarray] | None = None  # data-parallel: batches held until sync()

    def defer(self) -> None:
        """Hold batches until :meth:`sync` merges every rank's (data-parallel runs: global statistics)."""
        self._pending = []

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64)
        if self._pending is not None:
            self._pending.append(batch)
            return
        self._merge(batch.mean(axis=0), batch.var(axis=0), batch.shape[0])

    def sync(self, group: Any) -> None:
        """Merge the held batches of all ranks (a collective: every rank calls it at the same point)."""
        if self._pending is None:
            return
        shape = self.mean.shape
        held = np.concatenate([b.reshape((-1, *shape)) for b in self._pending]) if self._pending else None
        self._pending = []
        local = np.zeros((3, *shape))
        if held is not None:
            local = np.stack([np.full(shape, held.shape[0], dtype=np.float64), held.sum(0), (held**2).sum(0)])
        count, total, squares = group.sum(local).numpy()
        n = float(np.max(count))
        if n == 0:
            return
        mean = total / n
        self._merge(mean, np.maximum(squares / n - mean**2, 0.0), n)

    def _merge(self, batch_mean: np.ndarray, batch_var: np.ndarray, batch_count: float) -> None:
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = np.array(state["mean"]), np.array(state["var"]), float(state["count"])


class ObservationNormalizer:
    """``clip((obs - mean) / sqrt(var + eps))``; identity when disabled."""

    def __init__(self, shape: tuple[int, ...], *, enabled: bool, clip: float, eps: float = 1e-8) -> None:
        self.enabled, self.clip, self.eps = enabled, clip, eps
        self.stats = RunningMeanStd(shape)

    def sync(self, group: Any) -> None:
        """Merge every rank's observations of this rollout into the statistics (data-parallel runs)."""
        if self.enabled:
            self.stats.sync(group)

    def __call__(self, obs: np.ndarray, *, update: bool = False) -> np.ndarray:
        if not self.enabled:
            return obs
        if update:
            self.stats.update(obs)
        normalized = (obs - self.stats.mean) / np.sqrt(self.stats.var + self.eps)
        return np.clip(normalized, -self.clip, self.clip).astype(np.float32)


class RewardScaler:
    """Divide rewards by the running std of the discounted return (as SB3's VecNormalize does).

    Scaling by the return's spread, not the reward's, keeps value targets near unit size whatever
    the horizon; the mean is not subtracted, so the sign of every reward survives.
    """

    def __init__(self, num_envs: int, *, enabled: bool, gamma: float, clip: float, eps: float = 1e-8) -> None:
        self.enabled, self.gamma, self.clip, self.eps = enabled, gamma, clip, eps
        self.stats = RunningMeanStd(())
        self.discounted_return = np.zeros(num_envs, dtype=np.float64)

    def sync(self, group: Any) -> None:
        """Merge every rank's discounted returns of this rollout into the statistics (data-parallel runs)."""
        if self.enabled:
            self.stats.sync(group)

    def __call__(self, rewards: np.ndarray, episode_end: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return rewards
        self.discounted_return = self.discounted_return * self.gamma + rewards
        self.stats.update(self.discounted_return)
        self.discounted_return[episode_end] = 0.0
        scaled = rewards / np.sqrt(self.stats.var + self.eps)
        return np.clip(scaled, -self.clip, self.clip)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "discounted_return": self.discounted_return.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
        self.discounted_return = np.array(state["discounted_return"])
