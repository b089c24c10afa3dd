"""Distributed execution, driven by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

The same code path runs as one process on a CPU: every helper here is a no-op when not distributed.
Training and certification both start through :func:`launch`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from dmae.runtime import resolve_device

R = TypeVar("R")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size, local rank (all 0 / 1 / 0 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process (collectives are needed)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that logs and writes files."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs).

    Returns a single-process :class:`DistInfo` when ``WORLD_SIZE`` is unset or 1. Does not join again when
    a group already exists.

    Raises:
        KeyError: ``WORLD_SIZE > 1`` but ``RANK`` is not set.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def launch(job: Callable[[torch.device, DistInfo], R], device: str) -> R:
    """Resolve ``--device``, join torchrun's process group when launched by it, run ``job``, leave the group.

    The group is left even when ``job`` raises; its exception propagates.

    Raises:
        RuntimeError: ``device`` cannot be resolved (:func:`dmae.runtime.resolve_device`).
    """
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    info = init_distributed(dev)
    try:
        return job(dev, info)
    finally:
        cleanup(info)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if info.enabled:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``t`` over ranks: a detached copy when distributed (``t`` itself is untouched); in one
    process, ``t`` itself."""
    if not info.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def cleanup(info: DistInfo) -> None:
    """Leave the process group (no-op in one process or when no group was joined)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
