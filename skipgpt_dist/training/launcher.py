"""Which launcher started this process, and whether it suits parallel.backend.

Launchers are told apart by the environment they set (robust to argument parsing; documented in launcher()):
torchrun sets TORCHELASTIC_RUN_ID; the `deepspeed` launcher sets CROSS_RANK / CROSS_SIZE / LOCAL_SIZE (and passes
--local_rank) but not TORCHELASTIC_RUN_ID.
"""
from __future__ import annotations

import os

from ..errors import SkipGPTError


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launcher() -> str:
    """"torchrun" | "deepspeed" | "other" (e.g. srun with RANK/WORLD_SIZE set) | "none" (a plain process)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:
        return "deepspeed"
    return "other" if "WORLD_SIZE" in env else "none"


def check_launcher(cfg) -> None:
    backend, world, how = cfg.parallel.backend, launched_world_size(), launcher()
    if backend == "none" and world > 1:
        raise SkipGPTError(f"launched with WORLD_SIZE={world} but parallel.backend=none: set "
                           "parallel.backend=deepspeed or fsdp2, or launch one process")
    if backend == "fsdp2" and how == "deepspeed":
        raise SkipGPTError("parallel.backend=fsdp2 was started by the deepspeed launcher: launch FSDP2 with "
                           "`torchrun --nproc_per_node N train.py ...`, or pass --ds_config to train with DeepSpeed")
    if backend != "deepspeed" and cfg.parallel.ds_config is not None:
        raise SkipGPTError(f"parallel.ds_config={cfg.parallel.ds_config} is set but parallel.backend={backend}: "
                           "use parallel.backend=deepspeed (train.py --ds_config sets both) or drop ds_config")
