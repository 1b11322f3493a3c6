"""Load a routed model for inference: a folder written by tools/merge_lora.py (or a training checkpoint).

    model = load_routed_model("exports/tiny-routed")                   # the trained mode and capacity
    model = load_routed_model("exports/tiny-routed", mode="mask")      # the reference execution mode
    ids = model.generate(**tokenizer("To be", return_tensors="pt"), max_new_tokens=20, do_sample=False)

The folder is a plain Hugging Face model (merged weights, config.json, tokenizer) plus `routers.safetensors`; the
`skipgpt` section of config.json holds the router config (mode, capacity, KV policy). Loaded with
`AutoModelForCausalLM.from_pretrained` alone it is the dense model (every sublayer executes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .checkpoint import ROUTERS_FILE
from .errors import SkipGPTError

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def skipgpt_section(folder: str | Path) -> Optional[dict]:
    """The `skipgpt` section of folder/config.json, or None (no config.json, or a plain HF model)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        section = json.loads(path.read_text(encoding="utf-8")).get("skipgpt")
    except (OSError, ValueError) as err:
        raise SkipGPTError(f"{path} is not valid JSON ({err}): re-export the model with tools/merge_lora.py") from None
    return section if isinstance(section, dict) else None


def load_routed_model(path: str | Path, mode: Optional[str] = None, capacity: Optional[float] = None,
                      dtype: Optional[str] = None, device: Optional[str] = None):
    """A routed causal LM in eval mode, ready to generate.

    path: a folder exported by tools/merge_lora.py, or a training checkpoint / run folder (base + routers
    (+ LoRA adapters, unmerged)). mode / capacity override the trained execution mode (`mask`, `capacity`,
    `expert_choice`) and capacity. dtype: `float32` / `bfloat16` / `float16` (default: as saved).
    """
    folder = Path(path).expanduser()
    section = skipgpt_section(folder)
    if section is None:
        if (folder / "config.json").is_file():
            raise SkipGPTError(f"{folder} is a Hugging Face model without a `skipgpt` section in config.json: it has "
                               "no routers; export one with tools/merge_lora.py, or pass a training checkpoint")
        from .training.restore import load_checkpoint_model

        model = load_checkpoint_model(str(folder), mode, capacity)[0]
        return _place(model, dtype, device)
    return _place(_load_exported(folder, section, mode, capacity, dtype), None, device)


def _load_exported(folder: Path, section: dict, mode, capacity, dtype):
    from transformers import AutoModelForCausalLM

    from .routing import RouterConfig, attach_routers, load_routers

    if int(section.get("format_version", 1)) > 1:
        raise SkipGPTError(f"{folder} was exported by a newer skipgpt-dist (format_version "
                           f"{section.get('format_version')}): upgrade skipgpt-dist to load it")
    router_cfg = RouterConfig.from_dict(dict(section["router_config"])).with_execution(mode, capacity)
    if dtype is not None and dtype not in _DTYPES:
        raise SkipGPTError(f"dtype={dtype!r} is not supported: use one of float32, bfloat16, float16")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=_DTYPES.get(dtype, "auto"))
    except (OSError, ValueError) as err:
        raise SkipGPTError(f"{folder} could not be loaded ({str(err).splitlines()[0][:160]}): check that its weight "
                           "files are complete (re-export with tools/merge_lora.py)") from None
    attach_routers(model, router_cfg)
    load_routers(model, folder / section.get("routers_file", ROUTERS_FILE))
    return model.eval()


def _place(model, dtype, device):
    if dtype is not None:
        import torch

        if dtype not in _DTYPES:
            raise SkipGPTError(f"dtype={dtype!r} is not supported: use one of float32, bfloat16, float16")
        model = model.to(getattr(torch, _DTYPES[dtype]))
    if device is not None:
        model = model.to(device)
    return model.eval()
