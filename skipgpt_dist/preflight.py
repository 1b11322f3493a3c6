"""Check a run's inputs in seconds, before any node starts: config, model folder, data files, the stage-1
checkpoint of stage 2, the DeepSpeed JSON. One line (SkipGPTError) on the first problem."""
from __future__ import annotations

import argparse
import os

from .errors import SkipGPTError


def _check_exists(path: str, key: str, what: str) -> None:
    if not os.path.exists(os.path.expanduser(path)):
        raise SkipGPTError(f"{key}: {what} {path} does not exist: fix the path")


def preflight(cfg, world_size: int = 1) -> None:
    """Raise SkipGPTError (one line) for the inputs a run would fail on; touch nothing."""
    from . import assets
    from .checkpoint import find_checkpoint

    path = str(cfg.model.path)
    if path.startswith("builtin:"):
        if path not in (assets.SMOLLM2, assets.TINY):
            raise SkipGPTError(f"model.path={path}: unknown builtin model: use {assets.SMOLLM2} or {assets.TINY}")
    else:
        assets.resolve_model_path(path)  # a folder with config.json, or a one-line error
    for key in ("train_files", "eval_files"):
        for entry in assets.resolve_data_files(getattr(cfg.data, key), key=f"data.{key}"):
            _check_exists(entry, f"data.{key}", "data file")
    if cfg.stage.stage == 2:
        find_checkpoint(cfg.stage.init_from, key="stage.init_from")
    if cfg.checkpoint.resume not in ("auto", "never"):
        find_checkpoint(cfg.checkpoint.resume, key="checkpoint.resume")
    if cfg.parallel.ds_config is not None:
        _check_exists(cfg.parallel.ds_config, "parallel.ds_config", "DeepSpeed config")
    if cfg.parallel.backend == "none" and world_size > 1:
        raise SkipGPTError(f"parallel.backend=none cannot run on {world_size} ranks: use BACKEND=fsdp2 or "
                           "deepspeed, or one node with one rank")


def load_run_config(config: str | None, overrides: list[str], ds_config: str | None = None):
    from .config import load_config

    overrides = list(overrides)
    if ds_config:
        overrides += ["parallel.backend=deepspeed", f"parallel.ds_config={ds_config}"]
    return load_config(config, overrides, for_training=True)


def preflight_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m skipgpt_dist.launch preflight")
    parser.add_argument("--config")
    parser.add_argument("--ds_config")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.config, args.overrides, args.ds_config)
    preflight(cfg, args.world_size)
    print(f"preflight ok: stage {cfg.stage.stage}, model {cfg.model.path}, backend {cfg.parallel.backend}, "
          f"run_dir {cfg.run_dir}", flush=True)
    return 0
