"""Choose the back end: process-group set-up, how the base model loads, and the engine for parallel.backend
(none | deepspeed | fsdp2). The engines import nothing from here (their shared helpers live in engine.py, the
launcher checks in launcher.py), so this module is the only one that knows all of them.
"""
from __future__ import annotations

import atexit
import os

from . import distributed as D
from .compile import compile_model
from .engine import Engine, LocalEngine, enable_activation_checkpointing, report_held_parameters  # noqa: F401
from .launcher import check_launcher, launched_world_size, launcher  # noqa: F401


def setup_distributed(cfg) -> None:
    """Start the process group the back end needs; a single process with backend=none needs none."""
    check_launcher(cfg)
    backend = cfg.parallel.backend
    if backend == "deepspeed":
        from .deepspeed_engine import setup as setup_deepspeed

        setup_deepspeed(cfg)
    elif backend == "fsdp2":
        from .fsdp2_engine import setup as setup_fsdp2

        setup_fsdp2(cfg)
    if D.is_distributed():
        atexit.register(_teardown)


def _teardown() -> None:
    """Destroy the process group before the interpreter exits (gloo's threads otherwise can abort the exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> int:
    """End a finished run. A single process just returns `code`. A rank of a distributed run waits for its peers,
    destroys the process group, flushes its output and leaves with os._exit: interpreter finalisation after a
    DeepSpeed ZeRO-3 run can still meet gloo work objects that hold Python tensors and abort the process
    ("terminate called without an active exception", exit -6, seen in CI), turning a finished run into a failure.
    Everything the run writes (checkpoints, metrics.jsonl, wandb) is closed before this is called."""
    import sys

    if not D.is_distributed():
        return code
    try:
        D.barrier()
    finally:
        _teardown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def base_loader(cfg):
    """How model_setup.build_model loads the HF base: None = from_pretrained (ZeRO-3 partitions inside it when
    setup armed HfDeepSpeedConfig); FSDP2 builds on meta and loads weights into the shards later."""
    if cfg.parallel.backend == "fsdp2":
        from .fsdp2_engine import load_base_on_meta

        return load_base_on_meta
    return None


def make_engine(cfg, model) -> Engine:
    if cfg.parallel.backend == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg)
    if cfg.parallel.backend == "fsdp2":
        from .fsdp2_engine import FSDP2Engine

        return FSDP2Engine(model, cfg)
    if cfg.parallel.activation_checkpointing:
        enable_activation_checkpointing(model)
    engine = LocalEngine(model, cfg)  # (on the local GPU, if any, before compiling)
    compile_model(engine.model, cfg)
    return engine
