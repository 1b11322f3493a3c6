"""The few collectives checkpointing and the run lock need (rank, broadcast from rank 0, all ranks agree), each a
no-op in a single process, so the same code runs with and without torch.distributed initialised."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist


def current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_from_zero(obj):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def describe_error(err: Optional[BaseException]) -> Optional[str]:
    return None if err is None else f"{type(err).__name__}: {err}"


def all_ranks_ok(error: Optional[str]) -> Optional[str]:
    """Gather per-rank errors (None = success); return the first one, or None if every rank succeeded."""
    if not is_distributed():
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)
