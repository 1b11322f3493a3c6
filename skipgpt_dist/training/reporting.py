"""Rank-0 reporting: a progress line, metrics.jsonl in the run folder, and optional wandb (offline by default)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from . import distributed as D


def log(message: str) -> None:
    """Print on rank 0 only."""
    if D.is_main():
        print(message, file=sys.stderr, flush=True)


class RunReporter:
    def __init__(self, cfg, start_step: int, tokens_per_step: int):
        self.cfg = cfg
        self.enabled = D.is_main()
        self.tokens_per_step = tokens_per_step
        self.metrics_path = Path(cfg.run_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        self.started = time.time()
        if not self.enabled:
            return
        truncate_metrics(self.metrics_path, start_step)
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.optim.max_steps, initial=start_step, desc=f"stage {cfg.stage.stage}",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        if cfg.logging.wandb:
            self.wandb = _start_wandb(cfg)

    def step(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if k != "layers"}}
        if step % self.cfg.logging.every_steps == 0 or step == self.cfg.optim.max_steps or metrics.get("skipped"):
            self.write({**record, "layers": metrics.get("layers")})  # a skipped step is always on record
            if self.wandb is not None:
                self.wandb.log(_wandb_payload(metrics), step=step)
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss {metrics['loss']:.3f} lm {metrics['lm_loss']:.3f} attn {metrics['attn_sparsity']:.2f} "
                f"mlp {metrics['mlp_sparsity']:.2f} T {metrics['temperature']:.2f} "
                f"{metrics['tokens_per_s']:.0f} tok/s", refresh=False)
            self.bar.update(1)
        elif step % self.cfg.logging.every_steps == 0:
            log(f"step {step}/{self.cfg.optim.max_steps} loss {metrics['loss']:.4f} lm {metrics['lm_loss']:.4f} "
                f"sparsity attn {metrics['attn_sparsity']:.3f} mlp {metrics['mlp_sparsity']:.3f} "
                f"T {metrics['temperature']:.2f} {metrics['tokens_per_s']:.0f} tok/s")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json_line(record) + "\n")

    def eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        self.write({"step": step, "eval": result})
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def finite_or_none(value):
    """Non-finite floats (NaN, +-inf) -> None, recursively: JSON has no NaN (json.dumps would write a bare `NaN`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """One strict-JSON line: a non-finite number is written as null."""
    return json.dumps(finite_or_none(record), allow_nan=False)


def truncate_metrics(path: Path, start_step: int) -> None:
    """Drop the records of steps after `start_step` (re-run after a kill and resume; or everything, for a fresh
    start in an old folder) and any torn last line, atomically (temp file + rename). Rank 0, before appending."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError):
        lines = []
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill mid-write
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start_step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in kept))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _start_wandb(cfg):
    import wandb

    from ..config import config_to_dict

    # WANDB_MODE from the environment wins; keys come only from the environment / netrc, never from files here.
    mode = os.environ.get("WANDB_MODE", cfg.logging.wandb_mode)
    return wandb.init(project=cfg.logging.wandb_project, mode=mode, dir=cfg.run_dir, config=config_to_dict(cfg),
                      name=Path(cfg.run_dir).name, resume="allow")


def _wandb_payload(metrics: dict) -> dict:
    payload = {f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for idx, layer in enumerate(metrics.get("layers") or []):
        payload[f"sparsity_attn/layer_{idx:02d}"] = layer[0]
        payload[f"sparsity_mlp/layer_{idx:02d}"] = layer[1]
    return payload
