"""The DeepSpeed config (parallel.ds_config): read the user's JSON (or the built-in ZeRO-3 default), fill its
`auto` values from the project config, and refuse an explicit value that contradicts it, so the batch layout, the
optimiser and clipping have one source of truth. Plain JSON work: imports no DeepSpeed."""
from __future__ import annotations

import copy
import json
import math

from ..errors import SkipGPTError, read_user_file

# The built-in config (parallel.ds_config: null) = ds_configs/zero3.json: ZeRO-3 with production settings (a
# 13B-70B model fits only partitioned; one process and tiny models run with it too), the rest from the project
# config. Numbers, not "auto": resolve_ds_config fills "auto" only for the batch, clipping, bf16 and optimizer keys.
DEFAULT_DS_CONFIG = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto", "torch_adam": True}},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 50_000_000,
        "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_param_persistence_threshold": 100_000,
        "stage3_model_persistence_threshold": 9_223_372_036_854_775_807,  # sys.maxsize, DeepSpeed's default
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000,
        "stage3_gather_16bit_weights_on_model_save": False,
    },
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


def read_ds_config(path) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    text = read_user_file(path, f"parallel.ds_config={path} does not exist: give a DeepSpeed JSON file, e.g. "
                                "ds_configs/zero2.json or ds_configs/zero3.json",
                          f"parallel.ds_config={path} cannot be read ({{reason}}): give a readable DeepSpeed JSON file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SkipGPTError(f"parallel.ds_config={path} is not valid JSON (line {err.lineno}: {err.msg}): "
                           "fix the syntax (JSON has no comments or trailing commas)") from None
    if not isinstance(data, dict):
        raise SkipGPTError(f"parallel.ds_config={path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _fill(section: dict, key: str, value, ours: str, where: str) -> None:
    """section[key] = value if absent or "auto"; an explicit different value is an error naming both."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif not _same(current, value):
        shown = json.dumps(current) if not isinstance(current, str) else current
        raise SkipGPTError(f"ds_config {where}{key}={shown} contradicts {ours}={_show(value)}: set one of them to "
                           'match or use "auto"')


def _show(value) -> str:
    return json.dumps(list(value)) if isinstance(value, tuple) else json.dumps(value)


def resolve_ds_config(cfg, world_size: int) -> dict:
    """The ds_config with every `auto` filled from cfg; contradictions and unsupported sections are errors."""
    ds = read_ds_config(cfg.parallel.ds_config)
    o = cfg.optim
    _fill(ds, "train_micro_batch_size_per_gpu", o.micro_batch_size, "optim.micro_batch_size", "")
    _fill(ds, "gradient_accumulation_steps", o.grad_accum_steps, "optim.grad_accum_steps", "")
    _fill(ds, "train_batch_size", o.micro_batch_size * o.grad_accum_steps * world_size,
          f"optim.micro_batch_size x optim.grad_accum_steps x world size ({o.micro_batch_size} x "
          f"{o.grad_accum_steps} x {world_size})", "")
    _fill(ds, "gradient_clipping", float(o.grad_clip), "optim.grad_clip", "")
    bf16 = ds.setdefault("bf16", {})
    if not isinstance(bf16, dict):
        raise SkipGPTError('ds_config bf16 must be an object such as {"enabled": "auto"}')
    _fill(bf16, "enabled", cfg.parallel.mixed_precision == "bf16", "(parallel.mixed_precision == bf16)", "bf16.")
    # Without it, bf16 ZeRO-1/2 applies an update whose gradient norm is NaN/inf before the loop's guard sees it
    # (ZeRO-3 and fp32 check already); the loop then skips the step like any other non-finite one.
    bf16.setdefault("check_grad_overflow", True)
    if (ds.get("fp16") or {}).get("enabled") in (True, "auto"):
        raise SkipGPTError("ds_config fp16.enabled is not supported (no loss scaling in this project): remove the "
                           "fp16 section and use parallel.mixed_precision=bf16")
    if "scheduler" in ds:
        raise SkipGPTError("ds_config has a scheduler section: remove it; the LR schedule comes from optim.schedule, "
                           "optim.warmup_steps and optim.min_lr_ratio, shared by every back end")
    _fill_optimizer(ds, o)
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise SkipGPTError("ds_config zero_optimization.stage must be 0, 1, 2 or 3")
    ds.setdefault("steps_per_print", 10 ** 9)  # the loop reports; keep DeepSpeed's own step log quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _fill_optimizer(ds: dict, o) -> None:
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if not isinstance(opt, dict) or str(opt.get("type", "AdamW")).lower() != "adamw":
        raise SkipGPTError(f"ds_config optimizer.type={opt.get('type') if isinstance(opt, dict) else opt} is not "
                           "supported: use AdamW (every back end trains with the same AdamW)")
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    for key, value, ours in (("lr", o.lr, "optim.lr"), ("betas", list(o.betas), "optim.betas"),
                             ("eps", o.eps, "optim.eps"), ("weight_decay", o.weight_decay, "optim.weight_decay")):
        _fill(params, key, value, ours, "optimizer.params.")
    if params.setdefault("torch_adam", True) is not True:
        raise SkipGPTError("ds_config optimizer.params.torch_adam must be true: DeepSpeed's fused/CPU Adam kernels "
                           "are JIT-compiled (minutes) and not needed here")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
