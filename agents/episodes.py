"""Episode bookkeeping of a training run: running returns per env, finished episodes, per-iteration metrics.

Kept apart from the algorithm so that PPO's rollout reads as the algorithm, and with a
``state_dict`` of its own so that a checkpoint resumes episodes in flight exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.logger import Logger, episode_info_metrics, episode_samples


class EpisodeTracker:
    """Returns and lengths of the episodes in flight in ``num_envs`` envs, and those that finished."""

    def __init__(self, num_envs: int) -> None:
        self.running_return = np.zeros(num_envs)
        self.running_length = np.zeros(num_envs, dtype=np.int64)
        self.finished: list[tuple[int, float, int]] = []
        """Every finished training episode as ``(global_step, return, length)``."""
        self._iteration_returns: list[float] = []
        self._metrics: dict[str, list[float]] = {}
        self._samples: list[str] = []

    def step(self, reward: np.ndarray, done: np.ndarray, valid: np.ndarray, global_step: int,
             logger: Logger) -> None:
        """Add one vector-env step; ``valid`` masks envs whose step only reset them, ``done`` ends episodes."""
        self.running_return += np.where(valid, reward, 0.0)
        self.running_length += valid
        for i in np.flatnonzero(done):
            ret, length = float(self.running_return[i]), int(self.running_length[i])
            step = global_step + int(valid[: i + 1].sum())
            self.finished.append((step, ret, length))
            self._iteration_returns.append(ret)
            logger.scalars({"charts/episodic_return": ret, "charts/episodic_length": length}, step)
        self.running_return[done] = 0.0
        self.running_length[done] = 0

    def report(self, final_info: dict[str, Any], done: np.ndarray) -> None:
        """What the envs reported at episode ends (TextRLHF-v0: score, KL, ...; and sample completions)."""
        if not done.any():
            return
        for tag, values in episode_info_metrics(final_info, done).items():
            self._metrics.setdefault(tag, []).extend(values)
        self._samples = (self._samples + episode_samples(final_info, done))[-4:]

    def restart(self) -> None:
        """Every env starts a new episode: forget the ones in flight."""
        self.running_return[:], self.running_length[:] = 0.0, 0

    def flush(self, logger: Logger, global_step: int) -> dict[str, float]:
        """This iteration's episode metrics (means), with RLHF's reward split; the samples go to the log."""
        stats = {tag: float(np.mean(values)) for tag, values in self._metrics.items() if values}
        if "objective/score" in stats and self._iteration_returns:
            stats["objective/rlhf_reward"] = float(np.mean(self._iteration_returns))  # score + KL penalty
            stats["objective/non_score_reward"] = stats["objective/rlhf_reward"] - stats["objective/score"]
        if self._samples:
            logger.text("samples", "\n\n".join(self._samples), global_step)
        self._metrics, self._iteration_returns, self._samples = {}, [], []
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"episode_return": self.running_return.copy(), "episode_length": self.running_length.copy(),
                "episodes": list(self.finished)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "episode_return" in state:
            self.running_return = np.array(state["episode_return"], dtype=np.float64)
            self.running_length = np.array(state["episode_length"], dtype=np.int64)
        if "episodes" in state:
            self.finished = [tuple(e) for e in state["episodes"]]  # type: ignore[misc]
