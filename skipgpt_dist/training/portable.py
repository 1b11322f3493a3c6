"""Portable trainable state: what lets a checkpoint move between back ends, world sizes and ZeRO stages.

Every checkpoint holds, beside the engine's native state (DeepSpeed's, DCP, plain safetensors), a folder
`portable/` with the trainable parameters (routers, LoRA) and their AdamW state as full, unsharded fp32 tensors
keyed by a back-end-independent name, plus the step counts and the LR schedule:

    portable/params.safetensors       {name: fp32 tensor}
    portable/exp_avg.safetensors      {name: AdamW exp_avg}      (absent names: no optimiser state yet)
    portable/exp_avg_sq.safetensors   {name: AdamW exp_avg_sq}
    portable/state.json               {"format", "backend", "world_size", "zero_stage", "global_batch_size",
                                       "steps": {name: AdamW step}, "scheduler": LambdaLR state, "lr": [per group]}

Names: the model's own parameter names (peft's included) without the wrapper parts a back end adds
(DeepSpeed's `module.`, torch.compile's `_orig_mod.`, checkpoint/FSDP1 wrappers) and without peft's
`base_model.model.` prefix, so `model.layers.0.skipgpt_attn_router.proj.weight` is the same key on every back end.

Rank 0 writes (the full tensors are gathered collectively by the engine first, on every rank); every rank reads the
files and keeps what it needs (the state is tiny: routers and LoRA). The engines' save_portable / load_portable
do the gathering and the sharding; this module holds the file format and the resume decision.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import SkipGPTError
from ..file_names import DEEPSPEED_DIR, DEEPSPEED_LAYOUT_FILE
from . import distributed as D

PORTABLE_DIR = "portable"
PARAMS_FILE = "params.safetensors"
STATE_KEYS = ("exp_avg", "exp_avg_sq")
STATE_JSON = "state.json"
FORMAT = 1

_DROPPED_PARTS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
_PREFIXES = ("module.", "base_model.model.")


def portable_name(name: str) -> str:
    """A parameter name without wrapper parts: the same key whatever back end holds the parameter."""
    name = ".".join(part for part in name.split(".") if part not in _DROPPED_PARTS)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def portable_names(named) -> dict[str, object]:
    """{portable name: value} from (name, value) pairs; two names that collapse to one key are an error."""
    out = {}
    for name, value in named:
        key = portable_name(name)
        if key in out:
            raise RuntimeError(f"two trainable parameters share the portable name {key}")
        out[key] = value
    return out


# ---------------------------------------------------------------- files


def write(folder: Path, params: dict, states: dict, steps: dict, scheduler, layout: dict) -> None:
    """Rank 0: the portable files. params / states[key]: {portable name: full tensor}; steps: {name: int}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = lambda d: {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in d.items()}  # noqa: E731
    save_file(fp32(params), str(folder / PARAMS_FILE))
    for key in STATE_KEYS:
        save_file(fp32(states.get(key, {})), str(folder / f"{key}.safetensors"))
    sched = scheduler.state_dict()
    lrs = [group["lr"] for group in scheduler.optimizer.param_groups]
    meta = {"format": FORMAT, **layout, "steps": {k: int(v) for k, v in steps.items()}, "scheduler": sched,
            "lr": lrs}
    (folder / STATE_JSON).write_text(json.dumps(meta, indent=1, default=_json_default))


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read(folder: Path) -> tuple[dict, dict, dict]:
    """(params, {state key: tensors}, state.json) of a portable folder; a one-line error if it is not one."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        params = load_file(str(folder / PARAMS_FILE))
        states = {key: load_file(str(folder / f"{key}.safetensors")) for key in STATE_KEYS}
    except (OSError, ValueError) as err:
        raise SkipGPTError(f"checkpoint {folder.parent} has no readable portable state ({folder.name}/: "
                           f"{type(err).__name__}): resume it with the back end, world size and ZeRO stage that "
                           "wrote it") from None
    if meta.get("format") != FORMAT:
        raise SkipGPTError(f"{folder}: portable format {meta.get('format')} is not {FORMAT}")
    return params, states, meta


def check_names(folder: Path, wanted, params: dict) -> None:
    missing = sorted(set(wanted) - set(params))
    extra = sorted(set(params) - set(wanted))
    if missing or extra:
        example = missing[0] if missing else extra[0]
        raise SkipGPTError(f"checkpoint {Path(folder).parent} holds other trainable tensors than this run "
                           f"({len(missing)} missing, {len(extra)} unexpected, e.g. {example}): resume with the "
                           "stage and config that wrote it")


def load_scheduler(scheduler, meta: dict) -> None:
    """The LR schedule and each group's current lr (LambdaLR.load_state_dict does not touch the optimiser)."""
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, meta["lr"]):
        group["lr"] = lr


# ---------------------------------------------------------------- plain torch optimisers (one process, FSDP2)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param`: this rank's shard of a DTensor (no communication: every rank has the full
    tensor), or a plain tensor on the parameter's device and dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local_full = full.to(param.to_local().device, param.dtype)
        return distribute_tensor(local_full, param.device_mesh, param.placements, src_data_rank=None)
    return full.to(param.device, param.dtype)


def save_torch(folder: Path, named_params: dict, optimizer, scheduler, layout: dict) -> None:
    """save_portable of engines that drive a torch AdamW on (possibly DTensor) parameters. Collective."""
    params, states, steps = {}, {key: {} for key in STATE_KEYS}, {}
    for name, param in named_params.items():
        params[name] = full_tensor(param.detach()).cpu()
        state = optimizer.state.get(param, {})
        if "step" in state:
            steps[name] = int(float(state["step"]))
            for key in STATE_KEYS:
                states[key][name] = full_tensor(state[key]).cpu()
    if D.is_main():
        write(folder, params, states, steps, scheduler, layout)


def load_torch(folder: Path, named_params: dict, optimizer, scheduler) -> None:
    """load_portable of engines that drive a torch AdamW: parameters, exp_avg, exp_avg_sq, step, schedule."""
    params, states, meta = read(folder)
    check_names(folder, named_params, params)
    with torch.no_grad():
        for name, param in named_params.items():
            value = like(params[name], param)
            _local(param).copy_(_local(value))
            if name in meta["steps"]:
                optimizer.state[param] = {
                    "step": torch.tensor(float(meta["steps"][name]), dtype=torch.float32),
                    **{key: like(states[key][name], param).clone() for key in STATE_KEYS}}
            else:
                optimizer.state.pop(param, None)
    load_scheduler(scheduler, meta)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------- the resume decision


def checkpoint_layout(path: Path, state: dict) -> dict:
    """{"backend", "world_size", "zero_stage"} that wrote a checkpoint (portable/state.json, else the trainer
    state and DeepSpeed's layout file)."""
    try:
        meta = json.loads((Path(path) / PORTABLE_DIR / STATE_JSON).read_text())
        return {k: meta.get(k) for k in ("backend", "world_size", "zero_stage", "global_batch_size")}
    except (OSError, ValueError):
        pass
    layout = {"backend": state.get("backend"), "world_size": state.get("world_size"), "zero_stage": None,
              "global_batch_size": None}
    try:
        written = json.loads((Path(path) / DEEPSPEED_DIR / DEEPSPEED_LAYOUT_FILE).read_text())
        layout["zero_stage"] = written["zero_stage"]
    except (OSError, ValueError, KeyError):
        pass
    return layout


def run_layout(engine, cfg) -> dict:
    return {"backend": cfg.parallel.backend, "world_size": D.world_size(), "zero_stage": getattr(engine, "stage", None),
            "global_batch_size": cfg.global_batch_size(D.world_size())}


def describe(layout: dict) -> str:
    zero = f" ZeRO-{layout['zero_stage']}" if layout.get("backend") == "deepspeed" else ""
    return f"{layout.get('backend')}{zero} on {layout.get('world_size')} rank(s)"


def portable_reason(path: Path, state: dict, engine, cfg) -> str | None:
    """Why checkpoint `path` must be resumed from its portable state (None: the engine's native format loads it).

    Native where it can load: the same back end, and for DeepSpeed the same world size and ZeRO stage (DCP
    reshards FSDP2 checkpoints to any world size itself). Otherwise the portable state, or, for a checkpoint
    written before it existed, a one-line error."""
    written, here = checkpoint_layout(path, state), run_layout(engine, cfg)
    written_backend = written["backend"] or here["backend"]
    if written_backend == here["backend"] and (here["backend"] != "deepspeed" or (
            written["world_size"] == here["world_size"] and written["zero_stage"] in (None, here["zero_stage"]))):
        return None
    if not (Path(path) / PORTABLE_DIR / STATE_JSON).is_file():
        if written_backend == here["backend"]:
            return None  # the engine's own load names the mismatch
        ranks = {"deepspeed": f" on {written['world_size']} ranks", "fsdp2": " (any number of ranks)"}
        raise SkipGPTError(f"checkpoint {path} was written by parallel.backend={written_backend}, this run uses "
                           f"{here['backend']}, and it has no portable state ({PORTABLE_DIR}/): resume it with "
                           f"parallel.backend={written_backend}{ranks.get(written_backend, '')}, export it with "
                           "tools/consolidate.py, or start fresh with checkpoint.resume=never")
    reason = f"written by {describe(written)}, this run is {describe(here)}"
    if written.get("global_batch_size") not in (None, here["global_batch_size"]):
        reason += (f"; the global batch changes from {written['global_batch_size']} to {here['global_batch_size']} "
                   "rows, so the loss trajectory will differ from the run that wrote it")
    return reason
