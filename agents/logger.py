"""TensorBoard logging under the metric names CleanRL and SB3 users already read."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

# episode-end info keys some envs report (TextRLHF-v0 does), under the names TRL users read
EPISODE_INFO_TAGS = {
    "score": "objective/score",
    "episode_kl": "objective/kl",
    "completion_length": "objective/completion_length",
    "eos": "objective/eos_fraction",
}


def episode_info_metrics(final_info: dict[str, Any] | None, done: np.ndarray) -> dict[str, list[float]]:
    """Numeric episode-end values of the envs in ``done`` from a vector env's batched info dict.

    Reports the known keys of ``EPISODE_INFO_TAGS`` plus every ``score/<name>`` reward component.
    """
    metrics: dict[str, list[float]] = {}
    if not final_info:
        return metrics
    for key, values in final_info.items():
        tag = EPISODE_INFO_TAGS.get(key) or (f"objective/{key}" if key.startswith("score/") else None)
        if tag is None:
            continue
        present = final_info.get(f"_{key}", np.ones(len(done), dtype=bool))
        metrics[tag] = [float(values[i]) for i in np.flatnonzero(done & present)]
    if "objective/kl" in metrics and "objective/completion_length" in metrics:
        pairs = zip(metrics["objective/kl"], metrics["objective/completion_length"], strict=True)
        metrics["objective/kl_per_token"] = [kl / max(length, 1.0) for kl, length in pairs]
    return metrics


def episode_samples(final_info: dict[str, Any] | None, done: np.ndarray) -> list[str]:
    """``prompt -> completion (score)`` lines for a text panel, when the env reports them."""
    if not final_info or "completion" not in final_info:
        return []
    present = final_info.get("_completion", np.ones(len(done), dtype=bool))
    return [
        f"**{final_info['prompt'][i]}** {final_info['completion'][i]} (score {float(final_info['score'][i]):.3f})"
        for i in np.flatnonzero(done & present)
    ]


class Logger:
    """Writes scalars (and text) to TensorBoard when a logdir is given; does nothing otherwise.

    The writer is opened lazily, so an agent without a logdir never imports tensorboard.
    """

    def __init__(self, logdir: str | os.PathLike[str] | None) -> None:
        self.logdir = None if logdir is None else os.fspath(logdir)
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None and self.logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.logdir)
        return self._writer

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log ``{"losses/value_loss": 0.3, ...}`` at ``step``."""
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, config: dict[str, Any]) -> None:
        """Record the run's settings as a markdown table, so a run explains itself."""
        rows = "\n".join(f"|{key}|{value}|" for key, value in config.items())
        self.text("hyperparameters", f"|param|value|\n|-|-|\n{rows}", 0)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
