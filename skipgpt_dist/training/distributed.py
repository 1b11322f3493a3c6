"""The few collective helpers the loop needs; every one is a no-op in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a (detached) tensor over ranks; returns a new tensor."""
    values = values.detach().clone()
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if is_distributed():
        dist.barrier()
