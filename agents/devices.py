"""Which device an agent trains on: one answer that the policy, the buffer and a text env agree on."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def training_device(name: str, envs: Any) -> torch.device:
    """``PPOConfig.device`` made concrete; ValueError when it cannot work or disagrees with the env.

    A TextRLHF-v0 env samples with its own model, which the policy trains in place: the agent runs
    where that model is. ``"auto"`` picks it, else CUDA when present (this rank's GPU under torchrun).
    """
    model = getattr(envs, "model", None)
    env_device = next(model.parameters()).device if isinstance(model, nn.Module) else None
    if name == "auto":
        if env_device is not None:
            return env_device
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"PPOConfig.device={name!r}, but torch sees no CUDA device here: use device='cpu' "
                             "or device='auto'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"PPOConfig.device={name!r}, but torch sees {count} CUDA device(s): use an index "
                             f"below {count}")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"PPOConfig.device={name!r}, but MPS is not available here: use device='cpu'")
    if env_device is not None and env_device != device:
        raise ValueError(
            f"PPOConfig.device={name!r}, but the env's model is on {env_device}: build the env on that device "
            f"(gym.make_vec('TextRLHF-v0', ..., device={str(device)!r})) or use PPOConfig(device='auto')"
        )
    return device
