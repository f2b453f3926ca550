"""Process-group plumbing for data-parallel training under `torchrun` (or any launcher that sets the env
vars).

`DistContext.from_env()` reads RANK / WORLD_SIZE / LOCAL_RANK; with WORLD_SIZE > 1 it initialises a process
group (nccl on CUDA, gloo on CPU) and picks the device `cuda:LOCAL_RANK` or `cpu`. A single process needs no
launcher and no process group. The helpers are no-ops for one process. This module knows nothing about prompts
or data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "auto"  # what to pass to m2pt.loading.load_frozen_llava
    owns_group: bool = False  # True when this context created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> DistContext:
        """Join the process group torchrun describes, or run alone when WORLD_SIZE is unset or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        elif device == "auto":
            device = "cpu"
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns = True
        log.info("rank %d/%d on %s (%s)", rank, world, device, dist.get_backend())
        return cls(rank=rank, world_size=world, local_rank=local, device=device, owns_group=owns)

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` across ranks (float64 on the group's device)."""
        if not self.distributed:
            return list(values)
        device = (
            torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
