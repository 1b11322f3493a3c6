"""Rank-0 reporting: a progress line, metrics.jsonl in the run folder, and optional wandb (offline by default)."""
from __future__ import annotations

import json
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
        if step % self.cfg.logging.every_steps == 0 or step == self.cfg.optim.max_steps:
            self.write({**record, "layers": metrics.get("layers")})
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
            fh.write(json.dumps(record) + "\n")

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
