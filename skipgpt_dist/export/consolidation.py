"""consolidate: one safetensors file from any checkpoint (one process, ZeRO, DCP), keyed as the state_dict of the
model train.py trains, written tensor by tensor (the base weights streamed from their shards)."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Optional

import torch

from .atomic import check_new_path, check_not_inside, atomic_file
from .base_model import BaseModel, ShardReader, open_base_model
from .checkpoint_reader import Checkpoint, engine_trainable_state, open_checkpoint, read_routers
from .lora import PEFT_PREFIX, read_lora
from .safetensors_writer import TensorSpec, write_or_explain
from .shared import Log, print_log, check_fits

_SAVED_ROUTER_KEY = re.compile(r"^layers\.(\d+)\.(attn|mlp)_router\.(.+)$")


def consolidate(checkpoint: str | Path, out: str | Path, trainable_only: bool = False, force: bool = False,
                base: Optional[str] = None, log: Log = print_log) -> Path:
    """One safetensors file from any checkpoint (one process, ZeRO, DCP), keyed as the state_dict of the model
    train.py trains (peft names in stage 2). Full: base weights (from the base model folder) + routers + LoRA;
    trainable_only: routers + LoRA. Trained tensors come from the engine's files (fp32 masters), else from the
    portable artifacts."""
    from ..assets import resolve_model_path

    check_new_path(Path(out).absolute(), force, "--out")  # cheap checks first
    ckpt = open_checkpoint(checkpoint)
    trained = _trained_tensors(ckpt)
    out = Path(out)
    base_dir = Path(resolve_model_path(base if base is not None else ckpt.cfg.model.path))
    check_not_inside(out, {"checkpoint": ckpt.path, "base model": base_dir}, "--out")
    specs, produce = _trained_specs(trained)
    metadata = {"format": "pt", "skipgpt_stage": ckpt.stage, "skipgpt_source": str(ckpt.path),
                "skipgpt_contents": "trainable" if trainable_only else "full"}
    _, routers_meta = read_routers(ckpt)
    metadata["skipgpt_router_config"] = routers_meta["skipgpt_router_config"]
    with contextlib.ExitStack() as stack:
        if not trainable_only:
            model = open_base_model(base_dir)
            check_fits(model, None, routers_meta, ckpt)
            lora_modules = {k[len(PEFT_PREFIX):].split(".lora_")[0] for k in trained if ".lora_" in k}
            base_specs, source = _base_specs(model, ckpt.stage, lora_modules)
            reader = stack.enter_context(ShardReader(model.folder))
            specs = base_specs + specs

            def produce(spec: TensorSpec) -> torch.Tensor:
                return reader.get(*source[spec.name]) if spec.name in source else trained[spec.name]
        with atomic_file(out, force) as tmp:
            size = write_or_explain(tmp, specs, produce, metadata)
    log(f"wrote {out}: {len(specs)} tensors, {size / 2**20:.1f} MiB ({metadata['skipgpt_contents']}, stage "
        f"{ckpt.stage}, {ckpt.backend_name} checkpoint)")
    return out


def _trained_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Routers + LoRA under the training model's names."""
    prefix = PEFT_PREFIX if ckpt.stage == 2 else ""
    engine = engine_trainable_state(ckpt)
    trained = {k: v for k, v in engine.items() if "skipgpt_" in k or ".lora_" in k}
    if not any("skipgpt_" in k for k in trained):  # frozen routers (stage 2) are not in the engine's files
        routers, _ = read_routers(ckpt)
        for key, tensor in routers.items():
            m = _SAVED_ROUTER_KEY.match(key)
            trained[f"{prefix}model.layers.{m[1]}.skipgpt_{m[2]}_router.{m[3]}"] = tensor
    if ckpt.stage == 2 and not any(".lora_" in k for k in trained):
        trained.update(read_lora(ckpt, prefer="adapter").raw)
    return dict(sorted(trained.items()))


def _trained_specs(trained: dict[str, torch.Tensor]):
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in trained.items()]
    return specs, lambda spec: trained[spec.name]


def _base_specs(model: BaseModel, stage: int, lora_modules: set[str]):
    """Base tensors renamed as in the training model (stage 2: peft prefix, adapted weights under base_layer).
    Returns (specs in shard order, training name -> (shard, key))."""
    def rename(key: str) -> str:
        if stage != 2:
            return key
        module, _, leaf = key.rpartition(".")
        return f"{PEFT_PREFIX}{module}.base_layer.{leaf}" if module in lora_modules else f"{PEFT_PREFIX}{key}"

    specs, source = [], {}
    for shard, shard_specs in model.shards.items():
        for spec in shard_specs:
            specs.append(TensorSpec(rename(spec.name), spec.dtype, spec.shape))
            source[specs[-1].name] = (shard, spec.name)
    return specs, source
