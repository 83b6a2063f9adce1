"""Data-parallel training on torch.distributed: each rank owns its envs, the policy is DDP-wrapped.

Under ``torchrun`` (or ``accelerate launch``) the launcher sets ``WORLD_SIZE``, ``RANK`` and the
rendezvous address; :func:`process_group` joins that group once per process (gloo, plus NCCL for
CUDA tensors when the policy can be on a GPU); a group the script initialised itself is used as it
is. Gradients are averaged by ``DistributedDataParallel``; what else must be global (advantage
whitening, normalisation statistics, early stops) goes through the small reductions below, which
are the identity in a single process.
"""

from __future__ import annotations

import atexit
import os
import time
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


def backend_for(device: str, *, cuda: bool | None = None, nccl: bool | None = None) -> str:
    """The process group's backend for ``PPOConfig.device``: gloo, or with GPUs gloo and NCCL side by side.

    The statistics reduced here are small CPU tensors (gloo); DDP's gradients live on the policy's
    device, and on CUDA NCCL moves them GPU to GPU. ``"cpu:gloo,cuda:nccl"`` routes each tensor to
    the backend of its device.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    nccl = dist.is_available() and dist.is_nccl_available() if nccl is None else nccl
    wants_gpu = device == "auto" or device.startswith("cuda")
    return "cpu:gloo,cuda:nccl" if wants_gpu and cuda and nccl else "gloo"


def process_group(device: str = "auto") -> ProcessGroup:
    """Join the launcher's process group once (``WORLD_SIZE > 1``); a single process otherwise.

    With CUDA, each rank first takes the GPU of its ``LOCAL_RANK``, so "cuda" means that GPU for the
    policy, the env's models and NCCL alike.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_available():  # pragma: no cover - torch built without distributed support
        raise RuntimeError(f"WORLD_SIZE={world_size}, but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = backend_for(device)
        if "nccl" in backend:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
        atexit.register(_leave_process_group)
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size())


_THREADS_SETTLE_S = 0.5
"""How long the exit handler leaves the interpreter lock to gloo's worker threads (seconds)."""


def _leave_process_group() -> None:
    """Destroy the group this module joined, and let gloo's threads finish, while the interpreter is whole.

    A gloo worker thread that completed a reduction drops its tensors afterwards; when Python let go
    of them first, that takes the interpreter lock. At shutdown the lock is gone, the thread exits
    from inside C++ and the process aborts ("terminate called without an active exception", exit
    -6) after a run that succeeded (a core dump: ``take_gil`` -> ``pthread_exit`` under
    ``~AsyncAllreduceWork`` during ``Py_FinalizeEx``). Destroying the group does not stop those
    threads once a DDP wrapper was built (torch keeps the group alive), so the handler also sleeps:
    the lock is free for a moment, long enough for a descheduled worker to run on a loaded machine.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    time.sleep(_THREADS_SETTLE_S)


def share_prompts(envs: Any, group: ProcessGroup) -> None:
    """Give this rank its share of a text env's prompts (TextRLHF-v0's ``shard_prompts``), so that
    the ranks train on different prompts rather than each sampling from all of them."""
    if not group.active:
        return
    inner = getattr(envs, "envs", None)  # a SyncVectorEnv holds single envs
    targets = [envs] + ([env.unwrapped for env in inner] if isinstance(inner, list) else [])
    for env in targets:
        shard = getattr(env, "shard_prompts", None)
        if callable(shard):
            shard(group.rank, group.world_size)


def data_parallel(policy: torch.nn.Module, group: ProcessGroup) -> torch.nn.Module:
    """The module the update calls: ``policy`` itself, or a ``DistributedDataParallel`` around it.

    DDP broadcasts rank 0's weights at construction and averages gradients in the backward of every
    ``forward`` it ran, which is why the policy's training computation is its ``forward``.
    """
    if not group.active:
        return policy
    from torch.nn.parallel import DistributedDataParallel

    device = next(policy.parameters()).device
    return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
