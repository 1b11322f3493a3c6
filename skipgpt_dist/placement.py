"""Where a loaded routed model runs in the tools: one device, or split over several GPUs by a device map.

A model that no GPU holds (70B in bf16 is 140 GB) is split whole decoder layers at a time over the GPUs of one
node with accelerate's dispatch_model: each placed module's forward is wrapped by a hook that moves its inputs to
the module's device, so the layers run one after the other, each on its own GPU.

The order matters. accelerate keeps each wrapped module's original forward as an instance attribute, and routing
works by swapping the decoder layers' class (routing/api.py): a model dispatched BEFORE its routers were attached
would keep calling the unrouted forward and silently run dense. So the tools load on the host, attach routers and
LoRA, and dispatch last (place_model). Offloading (a "cpu" or "disk" entry beside GPUs) is refused: the offloaded
weights, router biases included, live on the meta device between forwards, where calibration could not move them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import SkipGPTError
from .routing import routed_layers

DeviceMap = dict[str, Union[str, int]]


def add_device_options(parser) -> None:
    """--device and --device-map, as every model-loading tool takes them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--device", default=None, help="where the model runs (default: cuda if available, under "
                                                      "torchrun each rank's own GPU; else cpu)")
    group.add_argument("--device-map", default=None, metavar="auto|MAP.json",
                       help="split the model over this node's GPUs, whole decoder layers per GPU (accelerate): "
                            "'auto', or a JSON file of module name -> device; one process, no offloading")


def placement(args) -> tuple[torch.device, Union[str, DeviceMap, None]]:
    """(device, device map) from add_device_options' arguments, checked before any model is loaded."""
    from .training.restore import tool_device

    if args.device_map is None:
        return tool_device(args.device), None
    check_single_process()
    return torch.device("cpu"), read_device_map(args.device_map)


def read_device_map(spec: str) -> Union[str, DeviceMap]:
    """--device-map: "auto" (accelerate balances the layers over the visible GPUs), or a JSON file mapping module
    names to devices ({"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1})."""
    if spec == "auto":
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SkipGPTError(f"--device-map {spec}: no such file: give 'auto' or a JSON file mapping module names to "
                           "devices")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SkipGPTError(f"--device-map {spec} is not readable JSON ({err}): write one object of module name -> "
                           "device") from None
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(v, (str, int)) for v in mapping.values()):
        raise SkipGPTError(f"--device-map {spec} must be one JSON object of module name -> device (0, \"cuda:1\", "
                           "\"cpu\")")
    return mapping


def check_single_process() -> None:
    """A device map splits one model over this node's GPUs: one process uses them all, so not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SkipGPTError("--device-map splits one model over the GPUs of one process: run the tool without "
                           "torchrun (or, under torchrun, give each rank its own GPU with --device)")


def place_model(model: torch.nn.Module, device: torch.device, device_map: Union[str, DeviceMap, None] = None,
                max_memory: Optional[dict] = None) -> torch.nn.Module:
    """The model on `device`, or dispatched by `device_map` (routers and LoRA must already be attached)."""
    if device_map is None:
        return model.to(device)
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        # whole decoder layers per device: a layer's sublayers, routers and slots stay together
        no_split = sorted({type(layer).__name__ for layer in routed_layers(model)})
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    else:  # names as in the Hugging Face model (from_pretrained's device_map), also under a LoRA wrapper
        prefix = hf_model_prefix(model)
        device_map = {prefix + name: device for name, device in device_map.items()}
    devices = {str(v) for v in device_map.values()}
    if devices & {"cpu", "disk"} and devices - {"cpu", "disk"}:
        raise SkipGPTError(f"the device map puts part of the model on {sorted(devices & {'cpu', 'disk'})} beside "
                           "GPUs (offloading), which routed models do not support (the offloaded router biases "
                           "live on the meta device): use more GPUs, or the training job's sharded evaluation")
    if "disk" in devices:
        raise SkipGPTError("the device map offloads to disk, which routed models do not support: map every module "
                           "to a GPU (or to cpu)")
    try:
        # hooks even when every entry names one device, so one device runs the same path as several
        with quiet_logger("accelerate.big_modeling", devices == {"cpu"}):  # (it says "offloaded" for all-cpu maps)
            return dispatch_model(model, device_map=device_map, force_hooks=True)
    except (ValueError, KeyError, RuntimeError) as err:
        raise SkipGPTError(f"the device map does not fit this model ({str(err).splitlines()[0][:200]}): name "
                           "every top-level module (model.embed_tokens, model.layers.N, model.norm, lm_head), or "
                           "use --device-map auto") from None


@contextlib.contextmanager
def quiet_logger(name: str, quiet: bool):
    logger = logging.getLogger(name)
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def hf_model_prefix(model: torch.nn.Module) -> str:
    """The module path of the Hugging Face model inside `model` ("" for the model itself; "base_model.model."
    under peft's LoRA wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, module in model.named_modules():
        if module is inner:
            return f"{name}." if name else ""
    return ""
