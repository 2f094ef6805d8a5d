"""Process-group set-up for ``torchrun`` (single- and multi-node) and single-process runs.

``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
When they are present we initialise the default process group (NCCL for CUDA, gloo for CPU) and
pin each process to ``cuda:LOCAL_RANK``; otherwise everything runs in one process and the
helpers below degrade to no-ops, so the trainer has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

DeviceChoice = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job: ``rank`` of ``world_size``, ``local_rank`` on its node,
    the ``device`` it computes on and whether it initialised the process group itself (and must
    therefore tear it down)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. ``cuda`` without a
    GPU is an error rather than a silent CPU fallback."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is False")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment, (0, 1, 0) without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world_size, local_rank


def init_distributed(device: str = "auto", *, backend: str | None = None) -> DistributedContext:
    """Join the torchrun job described by the environment (or reuse an already initialised
    default group). Backend: NCCL on CUDA, gloo on CPU unless ``backend`` says otherwise."""
    rank, world_size, local_rank = env_world()
    if dist.is_available() and dist.is_initialized():
        torch_device = resolve_device(device, local_rank)
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, torch_device, False)
    torch_device = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistributedContext(0, 1, 0, torch_device, False)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    chosen = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
    init_kwargs = {"device_id": torch_device} if chosen == "nccl" else {}
    dist.init_process_group(backend=chosen, rank=rank, world_size=world_size, **init_kwargs)
    return DistributedContext(rank, world_size, local_rank, torch_device, True)


def teardown_distributed(context: DistributedContext) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if context.owns_process_group and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy; the input is untouched). Identity in one process."""
    if not context.distributed:
        return value
    reduced = value.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / context.world_size


def broadcast_object(obj, context: DistributedContext, src: int = 0):
    """Rank ``src``'s Python object on every rank (e.g. the resume checkpoint path)."""
    if not context.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
