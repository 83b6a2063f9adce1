"""Where a NaN could enter training, a check that stops it there with a message naming the place.

Env rewards and observations are checked as they arrive, before normaliser statistics or the buffer
hold them; a non-finite loss or gradient is skipped or raised (``PPOConfig.max_nonfinite_steps``);
weights are checked after every optimizer step. ``where`` strings name the global step / iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from agents.errors import NonFiniteError, all_finite, first_nonfinite, nonfinite_tensor


def checked_rewards(reward: Any, num_envs: int, *, when: Callable[[], str]) -> np.ndarray:
    """A step's rewards as float64, or an error naming the env, ``when()`` and the value.

    ``when`` is only called to write an error: the check runs on every env step.
    """
    try:
        rewards = np.asarray(reward, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the vector env returned rewards {reward!r} that are not numbers ({error})") from error
    if rewards.shape != (num_envs,):
        raise ValueError(
            f"the vector env returned rewards of shape {rewards.shape}; expected ({num_envs},), one per env"
        )
    found = first_nonfinite(rewards)
    if found is not None:
        (env,), value = found
        raise NonFiniteError(
            f"env {env} returned reward {value!r} at {when()}; rewards must be finite numbers within float32's "
            "range: fix the env's reward, or clip it (gymnasium.wrappers.ClipReward)"
        )
    return rewards


def check_obs(obs: Any, *, source: str, when: Callable[[], str], env: int | None = None) -> None:
    """NonFiniteError naming the env, ``when()`` and the entry when a float observation is NaN / inf.

    ``obs`` is batched over envs (``env`` names the one env of a batch of one); integer
    observations (token ids) are skipped at no cost.
    """
    arrays = obs.items() if isinstance(obs, dict) else [(None, obs)]
    for key, array in arrays:
        found = first_nonfinite(array)
        if found is None:
            continue
        index, value = found
        where = f"[{key!r}]" if key is not None else ""
        entry = ", ".join(map(str, index[1:]))
        raise NonFiniteError(
            f"env {index[0] if env is None else env} returned a non-finite observation from {source} at {when()}: "
            f"obs{where}[{entry}] = {value!r}; observations must be finite numbers within float32's range: fix "
            "the env, or wrap it (gymnasium.wrappers.TransformObservation)"
        )


class NonFiniteSteps:
    """Counts optimizer steps skipped in a row for a NaN / inf loss or gradient; raises past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.streak = 0

    def passed(self) -> None:
        """A finite step was taken: the streak starts again."""
        self.streak = 0

    def skip_or_raise(self, loss: float, grad_norm: float, *, where: str, learning_rate: float) -> None:
        """Count a skipped step; raise NonFiniteError once more than ``limit`` came in a row."""
        self.streak += 1
        if self.streak <= self.limit:
            return
        quantity = f"the loss is {loss!r}" if not np.isfinite(loss) else (
            f"the gradient norm is {grad_norm!r} (the loss, {loss:.6g}, is finite)")
        streak = (f"{self.streak} such steps in a row, more than PPOConfig.max_nonfinite_steps={self.limit}"
                  if self.limit else "set PPOConfig.max_nonfinite_steps=N to skip up to N such steps in a row instead")
        raise NonFiniteError(
            f"{quantity} at {where}; the weights were not changed. Likely causes: "
            f"learning_rate={learning_rate!r} too large, or rewards / observations of extreme size "
            f"(try norm_reward=True, norm_obs=True, a smaller max_grad_norm); {streak}"
        )


def check_weights(
    parameters: list[torch.nn.Parameter], module: torch.nn.Module, *, where: str, learning_rate: float
) -> None:
    """NonFiniteError naming the first parameter of ``module`` that an optimizer step made NaN / inf."""
    # a finite gradient times a huge learning rate can still overflow float32 weights
    if all_finite(parameters):
        return
    found = nonfinite_tensor(module.named_parameters())
    if found is not None:
        name, bad, numel = found
        raise NonFiniteError(
            f"parameter {name!r} holds {bad} non-finite values (of {numel}) after the optimizer step at {where}: "
            f"the update overflowed. learning_rate={learning_rate!r} is likely too large; the weights are unusable "
            "now (save() refuses them): lower it and restart from the last good checkpoint"
        )
