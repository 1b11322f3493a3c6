"""Portable artifacts written into every checkpoint, whatever the back end: the routers (safetensors, with their
config) and, in stage 2, the LoRA adapter in peft's format. Tools read these without the training engine."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..file_names import ADAPTER_DIR, ADAPTER_WEIGHTS_FILE, ROUTERS_FILE
from ..routing import routing_context
from ..routing.api import _base_model
from . import distributed as D

_ROUTER_KEY = re.compile(r"layers\.(\d+)\.skipgpt_(attn|mlp)_router\.(.+)$")


def routers_from_named(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names of any wrapper -> save_routers' wrapper-free keys layers.{i}.{kind}_router.{param}."""
    out = {}
    for name, tensor in named.items():
        match = _ROUTER_KEY.search(name)
        if match:
            layer, kind, rest = match.groups()
            out[f"layers.{layer}.{kind}_router.{rest}"] = tensor.contiguous()
    return out


def export_artifacts(engine, model, folder: Path) -> None:
    """Called on every rank (gathering sharded weights is collective); rank 0 writes."""
    routers = routers_from_named(engine.gather_params(lambda n: "skipgpt_" in n))
    lora = engine.gather_params(lambda n: "lora_" in n)
    if not D.is_main():
        return
    ctx = routing_context(model)
    base = _base_model(model)
    meta = {"skipgpt_router_config": json.dumps(ctx.cfg.to_dict()), "num_layers": str(base.config.num_hidden_layers),
            "hidden_size": str(base.config.hidden_size)}
    save_file(routers, str(folder / ROUTERS_FILE), metadata=meta)
    if lora:
        write_adapter(model, lora, folder / ADAPTER_DIR)


def write_adapter(model, lora: dict[str, torch.Tensor], folder: Path) -> None:
    """peft's on-disk format (adapter_config.json + adapter_model.safetensors) from gathered LoRA weights."""
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, state_dict=lora)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS_FILE),
              metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(folder))
