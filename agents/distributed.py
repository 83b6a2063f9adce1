"""Data-parallel training on torch.distributed: each rank owns its envs, the policy is DDP-wrapped.

Under ``torchrun`` (or ``accelerate launch``) the launcher sets ``WORLD_SIZE``, ``RANK`` and the
rendezvous address; :func:`process_group` joins that group once per process (gloo on CPU, NCCL on
CUDA). Gradients are averaged by ``DistributedDataParallel``; what else must be global (advantage
whitening, normalisation statistics, early stops) goes through the small reductions below, which
are the identity in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


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

    def mean(self, value: float) -> float:
        """The mean of a number over ranks."""
        return float(self.sum(value)) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: decisions that must agree, or some rank would hang."""
        return bool(self.sum(float(bool(flag))) > 0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        if self.active:
            with torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=0)


def process_group() -> ProcessGroup:
    """Join the launcher's process group once (``WORLD_SIZE > 1``); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_available():  # pragma: no cover - torch built without distributed support
        raise RuntimeError(f"WORLD_SIZE={world_size}, but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size())
