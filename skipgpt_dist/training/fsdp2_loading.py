"""Building a model for FSDP2 without its weights, then filling this rank's shards from the safetensors files.

The HF architecture is built with its parameters on the meta device (buffers real, e.g. RoPE inv_freq), then each
meta parameter becomes a zero-stride CPU placeholder (one element of storage) so routers and LoRA attach exactly as
in a normal build. After fully_shard allocated this rank's shards, every safetensors file of model.path is read in
turn and each rank reads only the rows of each tensor its shard holds (safetensors get_slice; no communication, no
full tensor in memory). Every placeholder must be filled and no parameter may be left on meta."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import SkipGPTError
from ..file_names import INDEX_FILE
from .legacy_weights import legacy_builder


def load_base_on_meta(model_dir: str, dtype: str, trust_remote_code: bool):
    """The HF model with placeholder weights (read later, shard by shard, by apply_fsdp2)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model_setup import DTYPES

    files = weight_files(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise SkipGPTError(f"model.path={model_dir}: config.json is not a Hugging Face model config "
                           f"({type(err).__name__}): point model.path at a folder saved with save_pretrained") from err
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model.tie_weights()  # init_empty_weights re-wraps every registered parameter, which unties tied embeddings
    aliases = to_placeholders(model)
    model._skipgpt_deferred = {"dir": model_dir, "files": files, "aliases": aliases}
    return model


def weight_files(model_dir: str) -> list[str]:
    from safetensors import safe_open

    from .model_setup import weights_error

    folder = Path(model_dir)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise SkipGPTError(f"model.path={model_dir}: {index.name} is not a valid safetensors index "
                               f"({type(err).__name__}): restore it or re-save the model with "
                               "save_pretrained") from None
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names:
        raise SkipGPTError(f"model.path={model_dir} has no .safetensors weights: FSDP2 loads safetensors shard by "
                           "shard; re-save the model with save_pretrained(safe_serialization=True)")
    for name in names:  # headers only (cheap): a truncated or garbage file fails here, before anything is built
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError (bad header / truncated), OSError (missing, unreadable)
            raise weights_error(f"{name} of model.path={model_dir}", err) from None
    return [str(folder / n) for n in names]


def _is_placeholder(t: torch.Tensor) -> bool:
    return t.dim() > 0 and t.numel() > 1 and all(s == 0 for s in t.stride())


def to_placeholders(model: nn.Module) -> list[list[str]]:
    """Meta parameters -> frozen zero-stride CPU tensors (tied weights stay tied). Returns each placeholder's
    names (aliases of one tensor, e.g. tied embeddings) relative to the HF model: the safetensors keys."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.is_meta:
            names_of.setdefault(id(param), []).append(name)
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in new:
                    data = torch.zeros((), dtype=param.dtype).expand(param.shape)
                    new[id(param)] = nn.Parameter(data, requires_grad=False)
                module._parameters[key] = new[id(param)]
    return list(names_of.values())


def placeholders_to_meta(model: nn.Module) -> None:
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and _is_placeholder(param):
                if id(param) not in new:
                    new[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                  requires_grad=False)
                module._parameters[key] = new[id(param)]


def materialize(model: nn.Module, device: str) -> None:
    """to_empty on the sharded model (allocates this rank's shards), keeping what was already real: the
    routers / LoRA (their initial values) and the buffers (e.g. RoPE inv_freq)."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    named = lambda: list(model.named_parameters()) + list(model.named_buffers())  # noqa: E731
    keep = {name: local(t).detach().clone() for name, t in named() if not local(t).is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in named():
            if name in keep:
                local(t).copy_(keep[name])


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper (its parameter names are the safetensors keys)."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def _hf_name(name: str) -> str:
    return name.replace(".base_layer.", ".")  # peft's LoRA wrapper moves the original weight one level down


def load_into_shards(model: nn.Module, deferred: dict) -> None:
    """Copy each safetensors tensor into this rank's shard of the matching (placeholder) parameter, reading from
    the file only the rows this rank holds (safetensors get_slice), never a full tensor of a sharded parameter."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    current = {_hf_name(n): p for n, p in hf_model(model).named_parameters(remove_duplicate=False)}
    group_of = {name: i for i, names in enumerate(deferred["aliases"]) for name in names}
    loaded: set[int] = set()
    with torch.no_grad():
        for path in deferred["files"]:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    group = group_of.get(key)
                    if group is None or group in loaded:
                        continue
                    param, piece = current[key], f.get_slice(key)
                    shape = tuple(piece.get_shape())
                    if shape != tuple(param.shape):
                        raise SkipGPTError(f"model.path={deferred['dir']}: {key} has shape {shape} in "
                                           f"{Path(path).name}, the model expects {tuple(param.shape)}")
                    local, window = _local_window(param)
                    if window:
                        local.copy_(piece[window].to(param.dtype).to(local.device))
                    else:  # a scalar, or a layout that is not one box: read it whole, keep this rank's part
                        full = f.get_tensor(key).to(param.dtype)
                        if isinstance(param, DTensor):
                            full = distribute_tensor(full, param.device_mesh, param.placements,
                                                     src_data_rank=None).to_local()
                        local.copy_(full.to(local.device))
                    loaded.add(group)
    missing = [names[0] for i, names in enumerate(deferred["aliases"]) if i not in loaded]
    missing = _load_legacy_layout(hf_model(model), current, missing, deferred["files"])
    if missing:
        raise SkipGPTError(f"model.path={deferred['dir']}: {len(missing)} weights are not in its safetensors files "
                           f"(e.g. {missing[0]}): the files must use the model's own parameter names, as "
                           "save_pretrained writes them")


def _load_legacy_layout(hf: nn.Module, current: dict, missing: list[str], files: list[str]) -> list[str]:
    """Fill the parameters the files hold in the family's historical layout (legacy_weights); returns the names
    still missing. Each rank reads only the file tensors (and rows) of its own shard."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    builders = {name: legacy_builder(model_type, name) for name in missing}
    if not any(builders.values()):
        return missing
    with ExitStack() as stack, torch.no_grad():
        handles = [stack.enter_context(safe_open(path, framework="pt")) for path in files]
        where = {key: f for f in handles for key in f.keys()}

        def read(key: str, box: tuple) -> torch.Tensor:
            if key not in where:
                raise KeyError(key)
            return where[key].get_slice(key)[box]

        still = []
        for name, build in builders.items():
            if build is None:
                continue
            param = current[name]
            local, window = _local_window(param)
            try:
                part = build(read, window or tuple(slice(0, n) for n in param.shape)).to(param.dtype)
            except KeyError:
                still.append(name)
                continue
            if window is None and isinstance(param, DTensor):
                part = distribute_tensor(part, param.device_mesh, param.placements, src_data_rank=None).to_local()
            local.copy_(part.to(local.device))
    return still + [name for name, build in builders.items() if build is None]


def _local_window(param) -> tuple[torch.Tensor, tuple[slice, ...] | None]:
    """(this rank's local tensor, the index box of the global tensor it holds). FSDP2 shards dim 0 like
    torch.chunk (rank r: rows [r * ceil(n / W), ...), possibly none); the box comes from DTensor's own layout
    rule. None when the layout is not one box (e.g. a strided shard): then the caller reads the full tensor."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param, tuple(slice(0, n) for n in param.shape)
    local = param.to_local()
    if any(isinstance(p, Shard) and type(p) is not Shard for p in param.placements):
        return local, None  # _StridedShard and friends: a rank's rows are not contiguous
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape) != tuple(local.shape):
        return local, None
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))


def check_materialized(model: nn.Module) -> None:
    from torch.distributed.tensor import DTensor

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_meta or _is_placeholder(local):
            raise RuntimeError(f"{name} was never materialised (still {'meta' if local.is_meta else 'empty'})")
