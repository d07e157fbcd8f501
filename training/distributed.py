"""Multi-process training through ``torchrun``: DistributedDataParallel on NCCL (GPU) or gloo (CPU).

``torchrun --nproc_per_node=N -m medvision.cli train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``train``
notices and runs one process per rank. Without those variables everything is single-process, as before.
Each rank sees its own shard of every epoch's sample order (all ranks draw the same order from the
same seeded generator, then take every N-th sample), so the global batch is ``batch_size × N``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_name: str) -> DistInfo:
    """Join the process group torchrun describes (if any); pick NCCL for CUDA devices, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = (device_name == "auto" and torch.cuda.is_available()) or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather(info: DistInfo, obj) -> list:
    """Every rank's ``obj``, in rank order (just ``[obj]`` without a process group)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class ShardedSampler(Sampler[int]):
    """Every ``world_size``-th index of ``base``, starting at ``rank``; all ranks draw the same base order."""

    def __init__(self, base: Sampler[int], rank: int, world_size: int) -> None:
        self.base, self.rank, self.world_size = base, rank, world_size

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        usable = len(order) - len(order) % self.world_size  # equal shards: DDP needs equal step counts
        return iter(order[self.rank:usable:self.world_size])

    def __len__(self) -> int:
        return len(self.base) // self.world_size
