"""Build the model a stage trains: load the HF base, attach routers, freeze, and (stage 2) add LoRA."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..assets import resolve_model_path
from ..checkpoint import ROUTERS_FILE, find_checkpoint
from ..errors import SkipGPTError
from ..routing import RouterConfig, attach_routers, load_routers, routing_context

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(model_dir: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types for a folder without tokenizer files
        raise SkipGPTError(f"model.path={model_dir} has no usable tokenizer ({type(err).__name__}): save the "
                           "tokenizer into the model folder with tokenizer.save_pretrained") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_dir: str, dtype: str, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise SkipGPTError(f"model.path={model_dir}: config.json is not a Hugging Face model config "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:120]}): point model.path at a "
                           "folder saved with save_pretrained") from err
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype],
                                                    trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise SkipGPTError(f"model.path={model_dir} could not be loaded ({str(err).splitlines()[0][:160]}): "
                           "check that the weight files are complete") from err


def stage1_routers_file(init_from: str) -> Path:
    checkpoint = find_checkpoint(init_from, key="stage.init_from")
    path = checkpoint / ROUTERS_FILE
    if not path.is_file():
        raise SkipGPTError(f"stage.init_from={init_from}: checkpoint {checkpoint} has no {ROUTERS_FILE}: point it "
                           "at a stage-1 run folder or checkpoint")
    return path


def saved_router_config(routers_file: Path) -> RouterConfig:
    from safetensors import safe_open

    with safe_open(str(routers_file), framework="pt") as f:
        return RouterConfig.from_dict(json.loads(f.metadata()["skipgpt_router_config"]))


def prepare_model(model, cfg, routers_file: Path | None = None):
    """Attach routers and set what trains. Stage 1: routers only. Stage 2: LoRA (+ routers if asked)."""
    router_cfg = cfg.routers
    if cfg.stage.stage == 2:
        # Keep the policy the routers were trained under; execute as this stage's config says.
        router_cfg = saved_router_config(routers_file).with_execution(cfg.routers.mode, cfg.routers.capacity)
        if cfg.stage.train_routers:
            # Routers that keep training answer to this stage's regulariser (targets, alpha) and estimator.
            for key in ("gate_grad", "target_sparsity", "target_sparsity_attn", "target_sparsity_mlp", "alpha"):
                setattr(router_cfg, key, getattr(cfg.routers, key))
            router_cfg.validate()
    attach_routers(model, router_cfg)
    for param in model.parameters():
        param.requires_grad_(False)
    ctx = routing_context(model)
    if cfg.stage.stage == 1:
        for name, param in model.named_parameters():
            param.requires_grad_("skipgpt_" in name)
        return model
    load_routers(model, routers_file)
    # Frozen routers decide deterministically, as at evaluation; trained ones sample Gumbel gates only if asked.
    ctx.noisy = cfg.stage.train_routers and cfg.stage.router_noise
    ctx.temperature = router_cfg.temperature_end
    model = apply_lora(model, cfg.stage.lora)
    if cfg.stage.train_routers:
        for name, param in model.named_parameters():
            if "skipgpt_" in name:
                param.requires_grad_(True)
    return model


def apply_lora(model, lora_cfg):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise SkipGPTError(f"stage.lora.target_modules={list(lora_cfg.target_modules)} match no layer of this "
                           f"model ({str(err).splitlines()[0][:120]}): use names such as q_proj, v_proj, "
                           "gate_proj") from err


def build_model(cfg, load_base=None):
    """(model, tokenizer, model_dir) for a config, with every input checked before anything is written.

    `load_base(model_dir, dtype, trust_remote_code)` replaces load_base_model (backends.base_loader: FSDP2 builds
    on the meta device). Loading must not draw from the global RNG, so routers and LoRA start from the same values
    whatever the back end (ZeRO-3's zero.Init initialises weights before loading them).
    """
    model_dir = resolve_model_path(cfg.model.path)
    routers_file = stage1_routers_file(cfg.stage.init_from) if cfg.stage.stage == 2 else None
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        model = (load_base or load_base_model)(model_dir, cfg.model.dtype, cfg.model.trust_remote_code)
    model.config.use_cache = False
    return prepare_model(model, cfg, routers_file), tokenizer, model_dir


def trainable_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def describe_trainable(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} trainable of {total:,} parameters ({100.0 * trainable / max(total, 1):.3f}%)"


def world_size_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))
