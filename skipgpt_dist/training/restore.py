"""Rebuild a trained routed model (routers and, after stage 2, LoRA) from a checkpoint for evaluation or use."""
from __future__ import annotations

from ..checkpoint import ROUTERS_FILE, find_checkpoint
from ..config import load_config
from ..errors import SkipGPTError
from ..file_names import CONFIG_FILE
from ..routing import attach_routers, load_routers
from .artifacts import ADAPTER_DIR
from .model_setup import load_base_model, load_tokenizer, saved_router_config, weights_error
from ..assets import resolve_model_path


def load_checkpoint_model(path: str, mode: str | None = None, capacity: float | None = None):
    """(model in eval mode, tokenizer, training config) from a checkpoint folder or a run folder."""
    checkpoint = find_checkpoint(path, key="checkpoint")
    cfg = load_config(str(checkpoint / CONFIG_FILE))
    routers_file = checkpoint / ROUTERS_FILE
    if not routers_file.is_file():
        raise SkipGPTError(f"checkpoint {checkpoint} has no {ROUTERS_FILE}: it was not written by skipgpt-dist "
                           "train.py")
    model_dir = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    model = load_base_model(model_dir, cfg.model.dtype, cfg.model.trust_remote_code)
    router_cfg = saved_router_config(routers_file).with_execution(mode, capacity)
    attach_routers(model, router_cfg)
    load_routers(model, routers_file)
    adapter = checkpoint / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel
        from safetensors import SafetensorError

        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except SafetensorError as err:
            raise weights_error(f"the LoRA adapter in {adapter}", err) from None
    return model.eval(), tokenizer, cfg


def tool_device(name: str | None):
    """The device a tool's --device names; None: this rank's GPU (cuda:LOCAL_RANK) when CUDA is available, else
    the CPU."""
    import torch

    from .distributed import local_device

    if name is None:
        return local_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SkipGPTError(f"--device={name} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SkipGPTError(f"--device={name} but CUDA is not available here: use --device cpu")
    return local_device() if device.type == "cuda" and device.index is None else device  # torchrun: own GPU
