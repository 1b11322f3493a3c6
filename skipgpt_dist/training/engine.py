"""The engine interface the one training loop drives, and the single-process engine.

An engine owns the wrapped model, the optimiser and the LR schedule. DeepSpeed and FSDP2 implement the same
methods (see deepspeed_engine.py / fsdp2_engine.py), so the loop never branches on the back end. The helpers every
engine shares (optimiser, schedule, device, activation checkpointing, the held-parameters report) live here too,
so the engines import only this module and backends.py alone picks among them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import SkipGPTError
from ..file_names import OPTIMIZER_FILE, TRAINABLE_FILE
from . import distributed as D
from .launcher import launcher
from .schedule import lr_factor


class Engine:
    """What the loop needs from a back end."""

    name = "abstract"
    model: torch.nn.Module

    def backward(self, loss: torch.Tensor) -> None:  # loss: mean over this rank's micro-batch
        raise NotImplementedError

    def step(self) -> dict:
        """Clip, optimiser step, schedule step, zero grads -> {"grad_norm", "lr", "skipped"}. A non-finite global
        gradient norm (the same on every rank) is not applied: the step is skipped as by skip_step."""
        raise NotImplementedError

    def skip_step(self) -> dict:
        """End this optimiser step without an update (the loop saw a non-finite loss on some rank): gradients are
        dropped, parameters and optimiser state (moments, step count) stay as they are, the LR schedule still
        advances one step (so it stays aligned with the data) -> {"grad_norm": nan, "lr", "skipped": True}.
        Called on every rank, in place of step()."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:  # called on every rank
        raise NotImplementedError

    def load(self, folder: Path) -> None:  # called on every rank
        raise NotImplementedError

    def gather_params(self, predicate: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU copies of matching parameters; complete on rank 0. Called on every rank."""
        raise NotImplementedError

    def writable(self, params) -> contextlib.AbstractContextManager:
        """A context in which `params` can be written in place through their modules (e.g. router biases set by a
        warm start or calibration), every rank writing the same full values; the update reaches what the forward
        reads and what the optimiser steps. Here (one process; FSDP2, whose optimiser steps the sharded DTensors
        themselves, written through distribute_tensor by Router.set_margin_bias) nothing is needed; DeepSpeed
        overrides it. Called on every rank."""
        return contextlib.nullcontext()

    def save_portable(self, folder: Path) -> None:
        """The trainable parameters and their AdamW state as full fp32 tensors under back-end-independent names,
        plus steps and LR schedule (training/portable.py). Called on every rank (gathering); rank 0 writes."""
        raise NotImplementedError

    def load_portable(self, folder: Path) -> None:
        """Inverse of save_portable from any back end, world size or ZeRO stage. Called on every rank."""
        raise NotImplementedError


def build_optimizer(params, optim_cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay)


def build_scheduler(optimizer, optim_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, optim_cfg.warmup_steps, optim_cfg.max_steps, optim_cfg.schedule, optim_cfg.min_lr_ratio))


def advance_schedule(scheduler) -> None:
    """One LR-schedule step without an optimiser step (a skipped step); silences torch's "scheduler before
    optimizer" warning, which is expected when the very first step is skipped."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        scheduler.step()


def to_local_device(model: torch.nn.Module) -> torch.nn.Module:
    """The model on this process's GPU when there is one (the loop moves each batch to the model's device); on a
    CPU-only machine the model is left exactly as built. Before the optimiser exists, so its state follows."""
    from .distributed import local_device

    device = local_device()
    return model if device.type == "cpu" else model.to(device)


class LocalEngine(Engine):
    """One process, plain PyTorch."""

    name = "none"

    def __init__(self, model: torch.nn.Module, cfg):
        self.model = to_local_device(model)
        self.cfg = cfg
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise SkipGPTError("nothing to train: no parameter requires grad (check stage.stage and stage.lora)")
        self.optimizer = build_optimizer(list(self.params.values()), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.accum = cfg.optim.grad_accum_steps

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self) -> dict:
        params = list(self.params.values())
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if not torch.isfinite(norm):  # NaN/inf gradients: never applied
            return self.skip_step(float(norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": lr, "skipped": False}

    def skip_step(self, grad_norm: float = float("nan")) -> dict:
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        advance_schedule(self.scheduler)
        return {"grad_norm": grad_norm, "lr": lr, "skipped": True}

    def save(self, folder: Path) -> None:
        save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, str(folder / TRAINABLE_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        weights = load_file(str(folder / TRAINABLE_FILE))
        missing = sorted(set(self.params) - set(weights))
        if missing:
            raise SkipGPTError(f"checkpoint {folder} lacks {len(missing)} trainable tensors (e.g. {missing[0]}): it "
                               "was written by another stage or model; resume with the config that wrote it")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(weights[name])
        state = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def gather_params(self, predicate):
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if predicate(n)}

    def save_portable(self, folder: Path) -> None:
        from . import portable

        portable.save_torch(folder, portable.portable_names(self.params.items()), self.optimizer, self.scheduler,
                            portable.run_layout(self, self.cfg))

    def load_portable(self, folder: Path) -> None:
        from . import portable

        portable.load_torch(folder, portable.portable_names(self.params.items()), self.optimizer, self.scheduler)


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant recomputation of every decoder layer (HF's own, which wraps the routed forward too)."""
    from ..routing.api import _base_model

    base = _base_model(model)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def report_held_parameters(engine) -> None:
    """One line per rank on stdout: parameter elements this rank stores (tests and bench/dist_step.py parse it)."""
    print(f"[skipgpt rank {D.rank()}/{D.world_size()}] {engine.name} holds {engine.held_parameter_elements()} of "
          f"{engine.total_parameter_elements()} parameter elements (launcher: {launcher()})", flush=True)
