"""Data-parallel training on torch.distributed: each rank owns its envs, the policy is DDP-wrapped.

Under ``torchrun`` (or ``accelerate launch``) the launcher sets ``WORLD_SIZE``, ``RANK`` and the
rendezvous address; :func:`process_group` joins that group once per process (gloo); a group the
script initialised itself is used as it is. Gradients are averaged by ``DistributedDataParallel``;
what else must be global (advantage whitening, normalisation statistics, early stops) goes through
the small reductions below, which are the identity in a single process.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from agents.losses import masked_mean


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: ``rank`` of ``world_size`` (``0`` of ``1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The rank that logs and writes checkpoints."""
        return self.rank == 0

    # ------------------------------------------------------------------ reductions
    def sum(self, values: torch.Tensor | np.ndarray | float) -> torch.Tensor:
        """Elementwise sum over ranks, in float64 (counts and moments stay exact)."""
        tensor = torch.as_tensor(values, dtype=torch.float64).clone()
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of ``values`` where ``mask`` is 1, over every rank's entries (as one process would take it)."""
        if not self.active:
            return masked_mean(values, mask)
        total, count = self.sum([float((values * mask).sum()), float(mask.sum())])
        return (total / count.clamp(min=1.0)).to(device=values.device, dtype=values.dtype)

    def mean(self, value: float) -> float:
        """The mean of a number over ranks."""
        return float(self.sum(value)) / self.world_size

    def min(self, value: float) -> float:
        """The smallest value of a number over ranks."""
        tensor = torch.tensor(float(value), dtype=torch.float64)
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return float(tensor)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: decisions that must agree, or some rank would hang."""
        return bool(self.sum(float(bool(flag))) > 0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def process_group() -> ProcessGroup:
    """Join the launcher's process group once (``WORLD_SIZE > 1``); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_available():  # pragma: no cover - torch built without distributed support
        raise RuntimeError(f"WORLD_SIZE={world_size}, but this torch build has no torch.distributed")
    if not dist.is_initialized():
        # gloo: the statistics reduced here are CPU tensors, and gloo also all-reduces CUDA gradients;
        # NCCL needs every reduced tensor on the GPU, which comes with PPOConfig(device=...)
        dist.init_process_group(backend="gloo")
        atexit.register(_leave_process_group)
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size())


def _leave_process_group() -> None:
    """Destroy the group this module joined while the interpreter is still whole.

    Left to interpreter shutdown, gloo's worker threads are torn down mid-flight and the process
    aborts ("terminate called without an active exception") after a run that succeeded.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(policy: torch.nn.Module, group: ProcessGroup, config: Any) -> torch.nn.Module:
    """The module the update calls: ``policy`` itself, or a ``DistributedDataParallel`` around it.

    DDP broadcasts rank 0's weights at construction and averages gradients in the backward of every
    ``forward`` it ran, which is why the policy's training computation is its ``forward``.
    """
    if not group.active:
        return policy
    if config.ptx_coef > 0:
        raise ValueError(
            f"PPOConfig.ptx_coef={config.ptx_coef}: the pre-training loss is not averaged over ranks yet; "
            "train data-parallel with ptx_coef=0, or run one process"
        )
    from torch.nn.parallel import DistributedDataParallel

    device = next(policy.parameters()).device
    return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
