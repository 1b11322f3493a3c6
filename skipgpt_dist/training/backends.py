"""Choose the back end: process-group set-up and the engine for parallel.backend (none | deepspeed | fsdp2)."""
from __future__ import annotations

import os

from ..errors import SkipGPTError
from .engine import Engine, LocalEngine


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(cfg) -> None:
    """Start the process group the back end needs; a single process with backend=none needs none."""
    backend = cfg.parallel.backend
    if backend == "none":
        if launched_world_size() > 1:
            raise SkipGPTError(f"launched with WORLD_SIZE={launched_world_size()} but parallel.backend=none: set "
                               "parallel.backend=deepspeed or fsdp2, or launch one process")
        return
    if backend == "deepspeed":
        from .deepspeed_engine import setup as setup_deepspeed

        setup_deepspeed(cfg)
    elif backend == "fsdp2":
        from .fsdp2_engine import setup as setup_fsdp2

        setup_fsdp2(cfg)


def make_engine(cfg, model) -> Engine:
    if cfg.parallel.backend == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg)
    if cfg.parallel.backend == "fsdp2":
        from .fsdp2_engine import FSDP2Engine

        return FSDP2Engine(model, cfg)
    return LocalEngine(model, cfg)
