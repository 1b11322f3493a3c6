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
from ..routing.adapters import adapter_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_model_config(model_dir: str) -> None:
    """config.json of a model folder must be a JSON object (transformers reads it for the tokenizer too, and would
    report a corrupt one as a missing tokenizer)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return  # the loaders below name what is missing
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        where = f"line {err.lineno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else f"{type(err).__name__}"
        raise SkipGPTError(f"model.path={model_dir}: config.json is not valid JSON ({where}): restore it from the "
                           "model's source or re-save the model with save_pretrained") from None
    if not isinstance(data, dict):
        raise SkipGPTError(f"model.path={model_dir}: config.json holds a {type(data).__name__}, not a Hugging Face "
                           "model config: re-save the model with save_pretrained")


def weights_error(where: str, err: BaseException) -> SkipGPTError:
    """The one-line error for an unreadable (truncated, garbage) safetensors file."""
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return SkipGPTError(f"{where} is not a readable safetensors file ({reason}): it is truncated or corrupt; copy or "
                        "download it again")


def load_tokenizer(model_dir: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    check_model_config(model_dir)
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
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype],
                                                    trust_remote_code=trust_remote_code)
    except SafetensorError as err:
        raise weights_error(f"a weight file of model.path={model_dir}", err) from None
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

    try:
        with safe_open(str(routers_file), framework="pt") as f:
            text = (f.metadata() or {}).get("skipgpt_router_config")
    except Exception as err:  # SafetensorError for a bad header, OSError for an unreadable file
        raise weights_error(f"router file {routers_file}", err) from None
    if text is None:
        raise SkipGPTError(f"router file {routers_file} has no skipgpt_router_config metadata: it was not written by "
                           "skipgpt-dist; point at a checkpoint written by train.py")
    try:
        return RouterConfig.from_dict(json.loads(text))
    except ValueError as err:  # json.JSONDecodeError is a ValueError; SkipGPTError from from_dict passes through
        raise SkipGPTError(f"router file {routers_file} has corrupt router metadata ({err}): re-export it") from None


def prepare_model(model, cfg, routers_file: Path | None = None):
    """Attach routers and set what trains. Stage 1: routers only. Stage 2: LoRA (+ routers if asked)."""
    router_cfg = cfg.routers
    if cfg.stage.stage == 2:
        # Keep the policy the routers were trained under; execute as this stage's config says.
        # Keep stage 1's slots (its per-layer plan included) unless this stage's config sets its own.
        router_cfg = saved_router_config(routers_file).with_execution(cfg.routers.mode)
        if cfg.routers.sets_capacity():
            router_cfg = router_cfg.with_capacities_of(cfg.routers)
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
    """LoRA on the configured target modules, their names translated to the model's family by its adapter (the
    defaults are Llama's: Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj; Mixtral's experts are
    fused 3-D parameters peft cannot wrap as Linear, so its MLP names drop and LoRA adapts attention only)."""
    from peft import LoraConfig, get_peft_model

    asked = list(lora_cfg.target_modules)
    adapter = adapter_for(model)
    targets = adapter.lora_targets(asked)
    if not targets:
        raise _no_lora_target(asked, adapter, "none of them exists in this family")
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise _no_lora_target(asked, adapter, str(err).splitlines()[0][:120]) from err


def _no_lora_target(asked: list[str], adapter, why: str) -> SkipGPTError:
    names = ", ".join(adapter.lora_targets(("q_proj", "v_proj", "gate_proj")))  # the defaults, in this family
    return SkipGPTError(f"stage.lora.target_modules={asked} match no layer of this {adapter.family} model ({why}): "
                        f"use names such as {names}")


def build_model(cfg, load_base=None):
    """(model, tokenizer, model_dir) for a config, with every input checked before anything is written.

    `load_base(model_dir, dtype, trust_remote_code)` replaces load_base_model (backends.base_loader: FSDP2 builds
    on the meta device). Loading must not draw from the global RNG, so routers and LoRA start from the same values
    whatever the back end (ZeRO-3's zero.Init initialises weights before loading them).
    """
    from ..config import check_run_dir

    check_run_dir(cfg.run_dir)  # a file or a read-only folder: one line now, not a traceback at the first write
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
    # ZeRO-3 partitions each parameter in place (numel() 0 on every rank) and records its size as ds_numel
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} trainable of {total:,} parameters ({100.0 * trainable / max(total, 1):.3f}%)"


def world_size_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))
