"""DeepSpeed ZeRO back end (parallel.backend=deepspeed).

    setup(cfg)                      # before build_model: process group, resolved ds_config, HfDeepSpeedConfig (ZeRO-3)
    engine = DeepSpeedEngine(model, cfg)     # one function builds it: build_deepspeed(model, cfg)

The ds_config JSON is the user's (parallel.ds_config, or the built-in ZeRO-3 default, the same as
ds_configs/zero3.json). Its `auto` values are filled from the project config, and an explicit value that
contradicts the project config is an error naming both, so the batch layout, the optimiser and clipping have
one source of truth (ds_config.py). The optimiser is an AdamW built by DeepSpeed (`torch_adam: true`: no JIT-compiled
kernels); the LR schedule is ours (engine.build_scheduler), handed to
deepspeed.initialize so DeepSpeed steps and checkpoints it. A ds_config `scheduler` section is refused.

ZeRO-3 partitions weights as they load: setup() keeps an HfDeepSpeedConfig alive, so the `from_pretrained` in
model_setup.build_model (run on every rank; it runs collectives) builds the model under deepspeed.zero.Init.

Gradients: the loop calls backward(loss) once per micro-batch with this rank's mean loss, then step() once.
DeepSpeed divides the loss by gradient_accumulation_steps and averages gradients over ranks, so the update equals
one process on the global batch. Between micro-batches DeepSpeed's own step() is called off the accumulation
boundary (it only counts micro-steps there), which keeps its boundary bookkeeping aligned with ours.

Checkpoints are DeepSpeed's own (save_checkpoint / load_checkpoint, trainable parameters only, frozen base weights
come from model.path again); natively they resume only on the same number of ranks and ZeRO stage, and through
the checkpoint's portable state (training/portable.py) on any other layout or back end.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

from ..errors import SkipGPTError
from ..file_names import DEEPSPEED_DIR, DEEPSPEED_LAYOUT_FILE
from . import distributed as D
from .ds_config import DEFAULT_DS_CONFIG, read_ds_config, resolve_ds_config, zero_stage  # noqa: F401
from .engine import Engine, build_scheduler, enable_activation_checkpointing, report_held_parameters
from .launcher import launched_world_size

CKPT_TAG = "state"

_STATE: dict = {}  # the HfDeepSpeedConfig that must stay alive while ZeRO-3 models load


def require_deepspeed():
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise SkipGPTError(f"parallel.backend=deepspeed but deepspeed is not importable ({err}): "
                           "pip install deepspeed (or use parallel.backend=fsdp2)") from None
    return deepspeed


# ---------------------------------------------------------------- process group and ZeRO-3 loading


def _single_process_env() -> None:
    """`python train.py --ds_config ...` without a launcher: a 1-rank group (no MPI discovery)."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def setup(cfg) -> None:
    """Before the model is built: check the config, start the process group, arm ZeRO-3 partitioned loading."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds_config = resolve_ds_config(cfg, launched_world_size())  # fails fast, before any process group
    deepspeed = require_deepspeed()
    _single_process_env()
    if not torch.cuda.is_available():
        # facts.md: init_distributed JIT-compiles the shared-memory comm op (~2 min) unless told it is unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not D.is_distributed():
        # On GPUs NCCL for CUDA tensors plus gloo for CPU ones (DeepSpeed hands the string to init_process_group).
        deepspeed.init_distributed(dist_backend=D.backend_string(),
                                   auto_mpi_discovery=False, verbose=False)
    _STATE.pop("hf_ds_config", None)
    if zero_stage(ds_config) == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        _STATE["hf_ds_config"] = HfDeepSpeedConfig(ds_config)  # must stay alive while from_pretrained runs


# ---------------------------------------------------------------- the engine


def build_deepspeed(model, cfg):
    """(deepspeed engine, optimizer, lr scheduler, ds_config): the one place a DeepSpeed engine is built."""
    deepspeed = require_deepspeed()
    ds_config = resolve_ds_config(cfg, D.world_size())
    if cfg.parallel.activation_checkpointing:
        enable_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SkipGPTError("nothing to train: no parameter requires grad (check stage.stage and stage.lora)")
    ds_engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config, dist_init_required=False,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.optim))
    return ds_engine, optimizer, scheduler, ds_config


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model, cfg):
        self.cfg = cfg
        self.model, self.optimizer, self.scheduler, self.ds_config = build_deepspeed(model, cfg)
        self.stage = zero_stage(self.ds_config)
        self.accum = cfg.optim.grad_accum_steps
        self._micro = 0
        report_held_parameters(self)

    def backward(self, loss):
        self.model.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps
        self._micro += 1
        if self._micro < self.accum:
            self.model.step()  # off the boundary: DeepSpeed only advances its micro-step counter

    def step(self) -> dict:
        if self._micro != self.accum or not self.model.is_gradient_accumulation_boundary():
            raise RuntimeError(f"DeepSpeedEngine.step after {self._micro} backward calls, expected {self.accum}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.model.step()  # clip, optimiser step, our LambdaLR step, zero grads
        self._micro = 0
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if not self.model.was_step_applied():
            # DeepSpeed's own overflow check (ZeRO-1/2/3 in fp32, ZeRO-3 in bf16, bf16.check_grad_overflow) saw a
            # non-finite gradient norm and skipped the update, and with it the LR schedule: advance that here.
            self._advance_schedule()
            return {"grad_norm": norm if not math.isfinite(norm) else float("inf"), "lr": lr, "skipped": True}
        # (A non-finite norm that DeepSpeed applied anyway, bf16 ZeRO-1/2 without bf16.check_grad_overflow, is
        # counted as a bad step by the loop; the checkpoint guard keeps it out of every checkpoint.)
        return {"grad_norm": norm, "lr": lr, "skipped": False}

    def skip_step(self) -> dict:
        """Engine.skip_step. DeepSpeed must still step at the accumulation boundary (its micro/global step counters,
        gradient buffers and ZeRO partition bookkeeping are reset there), so model.step() runs as usual with the
        innermost torch optimiser's step() made a no-op for that one call: the fp32 master partitions and the Adam
        moments and step count are left exactly as they were, and the bit16 / partitioned parameters are re-copied
        from those unchanged masters. DeepSpeed steps our LambdaLR itself unless its overflow check fired (NaN
        gradients), in which case we advance it, so the schedule moves exactly once either way."""
        if self._micro != self.accum or not self.model.is_gradient_accumulation_boundary():
            raise RuntimeError(f"DeepSpeedEngine.skip_step after {self._micro} backward calls, expected {self.accum}")
        lr = self.optimizer.param_groups[0]["lr"]
        inner = self.optimizer
        while hasattr(inner, "optimizer"):
            inner = inner.optimizer  # ZeRO wrapper -> the torch AdamW over the fp32 partitions
        inner.step = lambda *args, **kwargs: None  # instance attribute: shadows the class method for this call
        try:
            self.model.step()
        finally:
            del inner.step
        self._micro = 0
        if not self.model.was_step_applied():
            self._advance_schedule()
        return {"grad_norm": float("nan"), "lr": lr, "skipped": True}

    def _advance_schedule(self) -> None:
        from .engine import advance_schedule

        advance_schedule(self.scheduler)

    # ------------------------------------------------------------ checkpoints

    def save(self, folder: Path) -> None:
        target = Path(folder) / DEEPSPEED_DIR
        self.model.save_checkpoint(str(target), tag=CKPT_TAG, exclude_frozen_parameters=True)
        if D.is_main():
            layout = {"world_size": D.world_size(), "zero_stage": self.stage}
            (target / DEEPSPEED_LAYOUT_FILE).write_text(json.dumps(layout))

    def load(self, folder: Path) -> None:
        target = Path(folder) / DEEPSPEED_DIR
        try:
            layout = json.loads((target / DEEPSPEED_LAYOUT_FILE).read_text())
        except (OSError, ValueError):
            raise SkipGPTError(f"checkpoint {folder} has no DeepSpeed state ({DEEPSPEED_DIR}/{DEEPSPEED_LAYOUT_FILE}): "
                               "it was not written by parallel.backend=deepspeed; resume with the back end that "
                               "wrote it") from None
        if layout["zero_stage"] != self.stage or layout["world_size"] != D.world_size():
            raise SkipGPTError(f"checkpoint {folder} was written by ZeRO-{layout['zero_stage']} on "
                               f"{layout['world_size']} ranks, this run is ZeRO-{self.stage} on {D.world_size()}: "
                               "DeepSpeed checkpoints resume only with the same ds_config stage and number of ranks")
        path, _ = self.model.load_checkpoint(str(target), tag=CKPT_TAG, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise SkipGPTError(f"DeepSpeed could not load the checkpoint in {target}: it is incomplete; resume from "
                               "another one (checkpoint.resume=auto picks the newest complete one)")

    # ------------------------------------------------------------ parameters

    def gather_params(self, predicate):
        """Full CPU copies; trainable ones from the fp32 master weights. Collective: every rank calls it."""
        from deepspeed.utils import safe_get_full_fp32_param

        named = [(n, p) for n, p in self.model.module.named_parameters() if predicate(n)]
        out = {}
        for name, param in named:
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is not None:
                out[name] = full.detach().cpu().clone()
        rest = [(n, p) for n, p in named if n not in out]
        if self.stage == 3 and rest:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in rest], modifier_rank=None):
                out.update({n: p.detach().cpu().clone() for n, p in rest})
        else:
            out.update({n: p.detach().cpu().clone() for n, p in rest})
        return out

    @contextlib.contextmanager
    def writable(self, params):
        """Engine.writable. ZeRO-3: the full parameters are gathered for the write and rank 0's values (the same
        on every rank) re-partitioned after it. Every stage: a trainable parameter's fp32 master partition, which
        DeepSpeed's optimiser steps and copies back over the working weights (a copy apart from them on a bf16
        base, with offload, under ZeRO-1/2), takes the new full value too, or the next step would undo the write."""
        from deepspeed.utils import safe_set_full_fp32_param

        params = list(params)
        gathered = contextlib.nullcontext()
        if self.stage == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        with gathered, torch.no_grad():
            yield
            for param in params:
                if param.requires_grad:  # frozen parameters have no master copy
                    safe_set_full_fp32_param(param, param.data)

    # ------------------------------------------------------------ portable state (any back end, any world size)

    def _portable_params(self) -> dict:
        from . import portable

        return portable.portable_names((n, p) for n, p in self.model.module.named_parameters() if p.requires_grad)

    def _fp32_partitions(self):
        """The flat fp32 partitions DeepSpeed's inner torch AdamW steps (None: the optimiser is a torch one)."""
        if self.stage == 3:
            return list(self.optimizer.fp32_partitioned_groups_flat)
        if hasattr(self.optimizer, "single_partition_of_fp32_groups"):
            return list(self.optimizer.single_partition_of_fp32_groups)
        return None

    def save_portable(self, folder: Path) -> None:
        """Full fp32 master weights and AdamW moments via deepspeed.utils.safe_get_full_* (collective, every rank,
        the same order); rank 0 writes."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        from . import portable

        named, flats = self._portable_params(), self._fp32_partitions()
        layout = portable.run_layout(self, self.cfg)
        if flats is None:
            portable.save_torch(folder, named, self.optimizer, self.scheduler, layout)
            return
        inner = self.optimizer.optimizer
        started = all("step" in inner.state.get(flat, {}) for flat in flats)
        if started and hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.optimizer._lazy_init_hp_params_optimizer_state()  # ZeRO-1/2: link the moments to the params
        step = int(float(inner.state[flats[0]]["step"])) if started else None
        params, states, steps = {}, {key: {} for key in portable.STATE_KEYS}, {}
        for name, param in named.items():
            params[name] = safe_get_full_fp32_param(param).detach().cpu()
            if started:
                steps[name] = step
                for key in portable.STATE_KEYS:
                    states[key][name] = safe_get_full_optimizer_state(param, key).detach().cpu()
        if D.is_main():
            portable.write(folder, params, states, steps, self.scheduler, layout)

    def load_portable(self, folder: Path) -> None:
        """Master weights and moments via safe_set_full_* (each rank keeps its partition), the working copy the
        forward reads (ZeRO-3: gathered, set, re-partitioned; ZeRO-1/2: the replica), step counts and schedule."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        from . import portable

        named, flats = self._portable_params(), self._fp32_partitions()
        if flats is None:
            portable.load_torch(folder, named, self.optimizer, self.scheduler)
            return
        params, states, meta = portable.read(folder)
        portable.check_names(folder, named, params)
        steps = set(meta["steps"].values())
        inner = self.optimizer.optimizer
        if steps:  # AdamW creates its state lazily at the first step: create it, then fill it
            for flat in flats:
                inner.state[flat] = {"step": torch.tensor(float(max(steps)), dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
            if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
                self.optimizer._hp_optimizer_states_linked = False
                self.optimizer._lazy_init_hp_params_optimizer_state()
        with torch.no_grad():
            for name, param in named.items():
                value = params[name]
                safe_set_full_fp32_param(param, value)
                if steps:
                    for key in portable.STATE_KEYS:
                        safe_set_full_optimizer_state(param, states[key][name], key)
                if self.stage == 3:
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                        param.data.copy_(value.to(param.device, param.dtype).view_as(param.data))
                else:
                    param.data.copy_(value.to(param.device, param.dtype))
        portable.load_scheduler(self.scheduler, meta)
        done = int(meta["scheduler"].get("last_epoch", 0))
        self.model.global_steps = done
        self.model.global_samples = done * self.model.train_batch_size()

    def held_parameter_elements(self) -> int:
        """Parameter elements this rank stores: ZeRO-3 partitions plus any full copies it keeps (persistent small
        parameters under stage3_param_persistence_threshold); ZeRO-1/2: full replicas."""
        return sum(p.ds_tensor.numel() + p.data.numel() if hasattr(p, "ds_tensor") else p.numel()
                   for p in self.model.parameters())

    def total_parameter_elements(self) -> int:
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.model.parameters())
