"""Choose the back end: launcher checks, process-group set-up, how the base model loads, and the engine for
parallel.backend (none | deepspeed | fsdp2).

Launchers are told apart by the environment they set (robust to argument parsing; documented in launcher()):
torchrun sets TORCHELASTIC_RUN_ID; the `deepspeed` launcher sets CROSS_RANK / CROSS_SIZE / LOCAL_SIZE (and passes
--local_rank) but not TORCHELASTIC_RUN_ID.
"""
from __future__ import annotations

import atexit
import os

from ..errors import SkipGPTError
from . import distributed as D
from .compile import compile_model
from .engine import Engine, LocalEngine


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


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant recomputation of every decoder layer (HF's own, which wraps the routed forward too)."""
    from ..routing.api import _base_model

    base = _base_model(model)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def report_held_parameters(engine) -> None:
    """One line per rank on stdout: parameter elements this rank stores (tests and bench/dist_step.py parse it)."""
    print(f"[skipgpt rank {D.rank()}/{D.world_size()}] {engine.name} holds {engine.held_parameter_elements()} of "
          f"{engine.total_parameter_elements()} parameter elements (launcher: {launcher()})", flush=True)
