"""What merge_lora and consolidate share: the check that a checkpoint was trained on the base model given, the
progress log, and the one-line error for a write that fails (disk full, permissions)."""
from __future__ import annotations

from typing import Callable, Optional

from ..errors import SkipGPTError
from .base_model import BaseModel
from .checkpoint_reader import Checkpoint
from .lora import Lora

Log = Callable[[str], None]


def print_log(msg: str) -> None:
    print(msg, flush=True)


def check_fits(base: BaseModel, lora: Optional[Lora], routers_meta: dict, ckpt: Checkpoint) -> None:
    """The adapter and the routers must have been trained on this base model."""
    fix = (f"pass the base model the checkpoint was trained on as --base (its config.yaml says "
           f"model.path={ckpt.cfg.model.path})")
    layers, hidden = base.config.get("num_hidden_layers"), base.config.get("hidden_size")
    if routers_meta.get("num_layers") != str(layers) or routers_meta.get("hidden_size") != str(hidden):
        raise SkipGPTError(f"the routers of {ckpt.path} are for {routers_meta.get('num_layers')} layers of hidden "
                           f"size {routers_meta.get('hidden_size')}, base model {base.folder} has {layers} x "
                           f"{hidden}: {fix}")
    if lora is None:
        return
    specs = base.specs
    for key, pair in lora.pairs.items():
        spec = specs.get(key)
        if spec is None:
            raise SkipGPTError(f"the adapter of {ckpt.path} ({lora.source}) adapts {key}, which base model "
                               f"{base.folder} does not store (another architecture, or a tied weight): {fix}")
        out_dim, in_dim = pair.b.shape[0], pair.a.shape[1]
        want = (in_dim, out_dim) if pair.fan_in_fan_out else (out_dim, in_dim)
        if tuple(spec.shape) != want:
            raise SkipGPTError(f"the adapter of {ckpt.path} does not fit base model {base.folder}: {key} is "
                               f"{tuple(spec.shape)} there but the LoRA update is {want}: {fix}")
        if not spec.dtype.is_floating_point:
            raise SkipGPTError(f"base weight {key} is {spec.dtype} (quantised?): merge into a float16/bfloat16/float32 "
                               "copy of the base model")
