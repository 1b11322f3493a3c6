"""FSDP2 back end (parallel.backend=fsdp2): `fully_shard` per decoder layer, then the root.

    setup(cfg)                                   # process group (D.backend_string()) + 1-D device mesh
    build_model(cfg, load_base=load_base_on_meta)   # model_setup: architecture on meta, weights not read yet
    engine = FSDP2Engine(model, cfg)             # apply_fsdp2: AC, fully_shard, then load weights into the shards

Loading: the HF architecture is built with its parameters on the meta device (buffers real, e.g. RoPE inv_freq),
then each meta parameter becomes a zero-stride CPU placeholder (one element of storage) so routers and LoRA attach
exactly as in a normal build (same devices, same RNG draws, so the trainable initial values equal the one-process
run). fully_shard allocates only this rank's shard of each parameter; then every safetensors file of model.path
is read in turn and each rank reads only the rows of each tensor that its shard holds (safetensors get_slice; no
communication, no full tensor in memory). Every placeholder must be filled and no parameter may be left on meta
(fsdp2_loading.py).

Gradients: backward(loss / grad_accum_steps) per micro-batch; FSDP2 reduce-scatters with the mean over ranks (only
on the last micro-batch of a step), so the update equals one process on the global batch. Clipping uses the global
norm over the sharded gradients.

Checkpoints: torch.distributed.checkpoint (DCP) of the trainable parameters and their optimiser state
(get_state_dict / set_state_dict; the frozen base comes from model.path again) plus the LR schedule in a small
JSON. DCP reshards on load, so a checkpoint resumes on any number of ranks, including one process
(`python train.py ... parallel.backend=fsdp2` starts a 1-rank group by itself).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SkipGPTError
from ..file_names import DCP_DIR, SCHEDULER_FILE
from . import distributed as D
from .engine import (Engine, build_optimizer, build_scheduler, enable_activation_checkpointing,
                     report_held_parameters)
from .fsdp2_loading import (check_materialized, hf_model, load_base_on_meta, load_into_shards,  # noqa: F401
                            materialize, placeholders_to_meta, weight_files)

_STATE: dict = {}


# ---------------------------------------------------------------- process group


def setup(cfg) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not D.is_distributed():
        backend = D.backend_string()  # on GPUs NCCL for CUDA tensors plus gloo for CPU ones
        if "WORLD_SIZE" not in os.environ:  # plain `python train.py`: a 1-rank group, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    from torch.distributed.device_mesh import init_device_mesh

    _STATE["mesh"] = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),))


def device_mesh():
    if "mesh" not in _STATE:
        raise RuntimeError("fsdp2_engine.setup(cfg) must run before the engine is built")
    return _STATE["mesh"]


# ---------------------------------------------------------------- the one place FSDP2 is applied


def apply_fsdp2(model: nn.Module, cfg) -> nn.Module:
    """Activation checkpointing, fully_shard per decoder layer, then the root; then load deferred weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..routing import routed_layers
    from .compile import compile_model

    if cfg.parallel.activation_checkpointing:
        enable_activation_checkpointing(model)  # HF non-reentrant AC: FSDP2's hooks stay outside the checkpoint
    if cfg.parallel.mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    mesh = device_mesh()
    deferred = hf_model(model).__dict__.get("_skipgpt_deferred")
    if deferred is not None:
        placeholders_to_meta(model)  # fully_shard then creates meta shards: nothing is allocated yet
    for layer in routed_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
        if cfg.parallel.activation_checkpointing:
            layer._gradient_checkpointing_func = functools.partial(_unshard_then_checkpoint, layer)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if deferred is not None:
        materialize(model, mesh.device_type)
        load_into_shards(model, deferred)
        del hf_model(model).__dict__["_skipgpt_deferred"]
    check_materialized(model)
    compile_model(model, cfg)  # per block, after AC and sharding (torchtitan's order)
    return model


def _unshard_then_checkpoint(layer, function, *args, **kwargs):
    """HF's per-layer checkpoint function, made FSDP2-safe. The sparsity-loss gradient enters a layer through
    the router statistics, not through the layer output, so the recomputation can start before FSDP2's
    pre-backward hook (registered on the output) has all-gathered the layer: unshard first (a no-op when the
    parameters are already unsharded; the post-backward hook reshards as usual)."""
    from torch.utils.checkpoint import checkpoint

    def run(*a, **k):
        layer.unshard()
        return function(*a, **k)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(self, model: nn.Module, cfg):
        self.cfg = cfg
        self.model = apply_fsdp2(model, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise SkipGPTError("nothing to train: no parameter requires grad (check stage.stage and stage.lora)")
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.accum = cfg.optim.grad_accum_steps
        self._micro = 0
        report_held_parameters(self)

    def backward(self, loss):
        self._micro += 1
        if self.accum > 1:  # reduce-scatter once per optimiser step, on the last micro-batch
            self.model.set_requires_gradient_sync(self._micro == self.accum)
        (loss / self.accum).backward()

    def step(self) -> dict:
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if not torch.isfinite(norm):  # the global norm, equal on every rank: every rank skips together
            return self.skip_step(float(norm))
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, clip, norm, foreach=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        return {"grad_norm": float(norm), "lr": lr, "skipped": False}

    def skip_step(self, grad_norm: float = float("nan")) -> dict:
        """No optimiser step: drop the (already reduce-scattered) gradients, advance the schedule (Engine.skip_step)."""
        from .engine import advance_schedule

        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        advance_schedule(self.scheduler)
        self._micro = 0
        return {"grad_norm": grad_norm, "lr": lr, "skipped": True}

    # ------------------------------------------------------------ checkpoints (DCP, reshardable)

    def _state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model_sd, "optimizer": optim_sd}, options

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        state, _ = self._state()
        dcp.save(state, checkpoint_id=str(Path(folder) / DCP_DIR))
        if D.is_main():
            (Path(folder) / SCHEDULER_FILE).write_text(json.dumps(self.scheduler.state_dict()))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        folder = Path(folder)
        if not (folder / DCP_DIR / ".metadata").is_file() or not (folder / SCHEDULER_FILE).is_file():
            raise SkipGPTError(f"checkpoint {folder} has no FSDP2 state ({DCP_DIR}/, {SCHEDULER_FILE}): it was not "
                               "written by parallel.backend=fsdp2; resume with the back end that wrote it")
        from torch.distributed.checkpoint.api import CheckpointException

        state, _ = self._state()
        # The loop verified every file against trainer_state.json before this (checkpoint.verify_checkpoint), so
        # the pickled dcp/.metadata read here is the one this project wrote.
        try:
            dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException, naming every rank
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise SkipGPTError(f"checkpoint {folder} does not match this model ({first}): resume with the stage "
                               "and config that wrote it") from err
        # The state holds the trainable parameters only (dcp.load above failed if any was missing): not strict.
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=options)
        self.scheduler.load_state_dict(json.loads((folder / SCHEDULER_FILE).read_text()))

    # ------------------------------------------------------------ parameters

    def gather_params(self, predicate):
        """Full CPU copies of the matching parameters (all-gathered one by one; every rank calls this)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, param in self.model.named_parameters():
            if predicate(name):
                full = param.full_tensor() if isinstance(param, DTensor) else param
                out[name] = full.detach().cpu().clone()
        return out

    # ------------------------------------------------------------ portable state (any back end, any world size)

    def _portable_params(self) -> dict:
        from . import portable

        return portable.portable_names((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def save_portable(self, folder: Path) -> None:
        """Full tensors via DTensor.full_tensor() (collective, every rank); rank 0 writes."""
        from . import portable

        portable.save_torch(folder, self._portable_params(), self.optimizer, self.scheduler,
                            portable.run_layout(self, self.cfg))

    def load_portable(self, folder: Path) -> None:
        """Every rank reads the full tensors and keeps its own shard (distribute_tensor without communication)."""
        from . import portable

        portable.load_torch(folder, self._portable_params(), self.optimizer, self.scheduler)

    def held_parameter_elements(self) -> int:
        from torch.distributed.tensor import DTensor

        return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in self.model.parameters())

    def total_parameter_elements(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
