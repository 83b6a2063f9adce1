"""The PPO loss terms, each a small pure function over masked batches."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the entries where ``mask`` is 1 (padding and reset steps carry 0)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_coef: float
) -> torch.Tensor:
    """PPO-Clip: minimise ``-min(r A, clip(r, 1-eps, 1+eps) A)``."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    return masked_mean(torch.max(unclipped, clipped), mask)


def kl_penalty_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """PPO-Penalty: minimise ``-(r A - beta * KL(old || new))``."""
    return masked_mean(-(ratio * advantages) + beta * kl, mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    *, clip_range: float | None,
) -> torch.Tensor:
    """Half the squared error to the returns; with ``clip_range``, the pessimum of clipped and not."""
    loss = (values - returns) ** 2
    if clip_range is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)
