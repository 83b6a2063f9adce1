"""TensorBoard logging under the metric names CleanRL and SB3 users already read."""

from __future__ import annotations

import os
from typing import Any


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
