"""The agent's exceptions, and the small helpers that find the first bad number for their messages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["NonFiniteError", "CheckpointError", "SpaceMismatchError", "first_nonfinite", "nonfinite_tensor",
           "all_finite"]

FLOAT32_MAX = float(np.finfo(np.float32).max)


class NonFiniteError(ValueError):
    """A NaN or infinite number where training needs finite ones; the message says where it came from.

    Raised where the number enters (an env's observation or reward, a loss, a gradient, the weights
    after an optimizer step, a checkpoint being written), so a NaN never spreads silently.
    """


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, incomplete or not ours; the message names the path."""


class SpaceMismatchError(CheckpointError, ValueError):
    """A checkpoint loaded onto an env whose observation or action space differs from its own."""


def first_nonfinite(values: Any) -> tuple[tuple[int, ...], float] | None:
    """Index and value of the first entry that is NaN, infinite, or beyond float32's range; None if all fit.

    Values are stored and trained on in float32, so a float64 1e39 is as unusable as inf.
    Non-float arrays (token ids, integer states) are never non-finite.
    """
    array = np.asarray(values)
    if array.dtype.kind not in "fc":
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(array)
        if finite.all() and (array.dtype.itemsize <= 4 or not (np.abs(array) > FLOAT32_MAX).any()):
            return None
        bad = ~finite | (np.abs(array) > FLOAT32_MAX)
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return index, float(array[index])


def nonfinite_tensor(named: Iterable[tuple[str, Any]]) -> tuple[str, int, int] | None:
    """``(name, bad_count, numel)`` of the first float tensor holding NaN or inf, else None."""
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                return name, int((~finite).sum()), tensor.numel()
    return None


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN and inf, in one batched pass (checked after every optimizer step).

    The max-norm propagates NaN and inf, and ``torch._foreach_norm`` (what ``clip_grad_norm_`` runs)
    takes the whole list in one call: on a tiny MLP a loop of ``isfinite`` costs more than the step.
    """
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return True
    try:
        norms = torch._foreach_norm(floats, float("inf"))
    except (AttributeError, RuntimeError, TypeError):  # a torch or device without it
        return all(bool(torch.isfinite(t).all()) for t in floats)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
