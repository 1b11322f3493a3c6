"""Public routing API: attach routers to an HF causal LM, read statistics, the sparsity loss, router files."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import SkipGPTError
from .adapters import adapter_for
from .attention import check_backend
from .config import RouterConfig
from .context import RoutingContext, capture_attention_mask
from .layer import LayerRouting, RoutedLayerMixin
from .moe import install_moe_aux
from .routers import Router

ROUTER_NAMES = ("skipgpt_attn_router", "skipgpt_mlp_router")
# Routers (and so their optimiser state) are fp32 whatever the base dtype: bf16 cannot hold a small update
# (bf16(1.0) + 2e-3 == 1.0). Their compute may still run in bf16 (FSDP2's param_dtype, DeepSpeed's bf16 module
# copy); their logits are upcast to fp32 for the gate decisions.
ROUTER_DTYPE = torch.float32
_ROUTED_CLASSES: dict[type, type] = {}


def _routed_class(cls: type) -> type:
    """A subclass of the HF layer class whose forward is the routed block (one per base class)."""
    if cls not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[cls] = type(f"Routed{cls.__name__}", (RoutedLayerMixin, cls), {})
    return _ROUTED_CLASSES[cls]


def _base_model(model: nn.Module) -> nn.Module:
    """Unwrap peft and engine wrappers (DeepSpeed's `.module`) down to the HF model that holds the routers."""
    for _ in range(8):
        if getattr(model, "_skipgpt_ctx", None) is not None:
            break
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            break
    return model


def routing_context(model: nn.Module) -> RoutingContext:
    ctx = getattr(_base_model(model), "_skipgpt_ctx", None)
    if ctx is None:
        raise SkipGPTError("this model has no SkipGPT routers: call attach_routers(model, RouterConfig(...)) first")
    return ctx


def attach_routers(model: nn.Module, cfg: Optional[RouterConfig] = None) -> nn.Module:
    """Wrap the decoder layers of an HF causal LM in place with SkipGPT routing; returns the model."""
    cfg = (cfg or RouterConfig()).validate()
    if getattr(model, "_skipgpt_ctx", None) is not None:
        raise SkipGPTError("routers are already attached to this model: attach once, or change the config with "
                           "routing_context(model).cfg")
    adapter = adapter_for(model)
    check_backend(cfg.attn_backend)
    if cfg.attn_backend == "flash" and cfg.kv_policy != "routed":
        raise SkipGPTError("routers.attn_backend=flash serves kv_policy=routed only (flash-attn's causal mask is "
                           "wrong for gathered queries under kv_policy=all): use attn_backend=auto, sdpa or flex")
    config = model.config
    shape = adapter.shape(config)
    layers = adapter.decoder_layers(model)
    check_layer_capacity(cfg, len(layers))
    if any(hasattr(layer, "_hf_hook") for layer in layers):
        raise SkipGPTError("this model was dispatched by accelerate (from_pretrained(device_map=...)) before routers "
                           "were attached: its layers would keep their unrouted forward and run dense. Load it "
                           "without a device map, attach routers, then dispatch (skipgpt_dist.placement.place_model)")
    ctx = RoutingContext(cfg=cfg, temperature=cfg.temperature_start)
    for idx, layer in enumerate(layers):
        reference = next(getattr(layer, adapter.attn).parameters())  # (its device and dtype)
        for name in ROUTER_NAMES:
            router = Router(config.hidden_size, cfg.router_type, init_bias=float(cfg.init_margin),
                            normalize_input=cfg.normalize_input)
            setattr(layer, name, router.to(device=reference.device, dtype=ROUTER_DTYPE))
        scale = getattr(getattr(layer, adapter.attn), "scaling", shape.head_dim ** -0.5)
        layer._skipgpt = LayerRouting(idx, adapter, shape, adapter.sliding_window(layer, config), scale, ctx,
                                      softcap=adapter.softcap(layer, config))
        layer.__class__ = _routed_class(type(layer))
    base = _inner_model(model, adapter)
    base.register_forward_pre_hook(capture_attention_mask(ctx), with_kwargs=True)
    if adapter.moe_router is not None:
        install_moe_aux(model, layers, adapter, ctx)
    model._skipgpt_ctx = ctx
    return model


def check_layer_capacity(cfg: RouterConfig, num_layers: int) -> None:
    """A per-layer capacity plan must name every layer of the model it is attached to."""
    plan = cfg.layer_capacity
    if plan is not None and len(plan["attn"]) != num_layers:
        raise SkipGPTError(f"routers.layer_capacity has {len(plan['attn'])} layers, the model {num_layers}: a plan "
                           "is made for one model (give one fraction per layer, or leave it unset)")


def set_layer_capacity(model: nn.Module, plan: Optional[dict]) -> None:
    """Replace the per-layer capacity plan of attached routers (validated; saved with the routers)."""
    ctx = routing_context(model)
    cfg = dataclasses.replace(ctx.cfg, layer_capacity=plan)
    check_layer_capacity(cfg, len(routed_layers(model)))
    ctx.cfg = cfg


def _inner_model(model: nn.Module, adapter) -> nn.Module:
    module = model
    for name in adapter.layers_path.split(".")[:-1]:
        module = getattr(module, name)
    return module


def routed_layers(model: nn.Module) -> list[nn.Module]:
    base = _base_model(model)
    return [m for m in base.modules() if isinstance(m, RoutedLayerMixin)]


def router_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in _base_model(model).named_parameters():
        if any(part in name for part in ROUTER_NAMES):
            yield name, param


def set_temperature(model: nn.Module, temperature: float) -> None:
    routing_context(model).temperature = float(temperature)


@contextlib.contextmanager
def routing_disabled(model: nn.Module):
    """Run the model as the dense original (every sublayer executes), e.g. for a dense-vs-routed comparison."""
    ctx = routing_context(model)
    previous, ctx.enabled = ctx.enabled, False
    try:
        yield model
    finally:
        ctx.enabled = previous


@contextlib.contextmanager
def inference_slots(model: nn.Module, slots: str):
    """Run with routers.inference_slots=slots (`dynamic` or `static`), e.g. `static` while several ranks evaluate
    a sharded model: with dynamic slots a rank whose tokens all skip a sublayer would not run it, and ZeRO-3
    (which gathers parameters per submodule) would leave the other ranks waiting in that sublayer's gather."""
    ctx = routing_context(model)
    previous, ctx.cfg = ctx.cfg, dataclasses.replace(ctx.cfg, inference_slots=slots)
    try:
        yield model
    finally:
        ctx.cfg = previous


def routing_stats(model: nn.Module) -> dict:
    """Per-layer, per-kind statistics of the last forward (padding excluded).

    Returns {"layers": [{"attn": {"execute": f, "overflow": n, "tokens": n}, "mlp": {...}}, ...],
    "attn_execute": f, "mlp_execute": f, "sparsity": f}. execute = fraction of real tokens that ran the sublayer
    (after capacity); overflow = tokens the router chose but no capacity slot was left for.
    """
    ctx = routing_context(model)
    layers, totals = [], {"attn": [0.0, 0.0], "mlp": [0.0, 0.0]}
    for idx in sorted(ctx.stats):
        entry = {}
        for kind, s in ctx.stats[idx].items():
            tokens, executed = float(s["valid"]), float(s["executed"])
            entry[kind] = {"execute": executed / max(tokens, 1.0), "overflow": int(s["decided"] - s["executed"]),
                           "tokens": int(tokens)}
            totals[kind][0] += executed
            totals[kind][1] += tokens
        layers.append(entry)
    attn = totals["attn"][0] / max(totals["attn"][1], 1.0)
    mlp = totals["mlp"][0] / max(totals["mlp"][1], 1.0)
    return {"layers": layers, "attn_execute": attn, "mlp_execute": mlp, "sparsity": 1.0 - (attn + mlp) / 2}


def routing_stats_tensor(model: nn.Module) -> torch.Tensor:
    """routing_stats' execute fractions as one float64 tensor on the statistics' device, read without a host sync
    (the training loop accumulates it over micro-batches and transfers once per step):
    [attn_execute, mlp_execute, layer 0 attn execute, layer 0 mlp execute, layer 1 attn execute, ...]."""
    ctx = routing_context(model)
    if not ctx.stats:  # as routing_stats: no layer recorded anything, so no fraction executed
        return torch.zeros(2, dtype=torch.float64)
    entries = [ctx.stats[idx] for idx in sorted(ctx.stats)]
    # one device for all: under a device map (placement.py) each layer's statistics are on its own GPU
    device = torch.as_tensor(entries[0]["attn"]["executed"]).device
    executed = torch.stack([torch.stack([torch.as_tensor(e[k]["executed"]).to(device) for k in ("attn", "mlp")])
                            for e in entries]).double()
    tokens = torch.stack([torch.stack([torch.as_tensor(e[k]["valid"]).to(device) for k in ("attn", "mlp")])
                          for e in entries]).double()
    totals = executed.sum(dim=0) / tokens.sum(dim=0).clamp_min(1.0)
    return torch.cat([totals, (executed / tokens.clamp_min(1.0)).flatten()])


def sparsity_loss(model: nn.Module, cfg: Optional[RouterConfig] = None) -> torch.Tensor:
    """alpha * |T - mean(g)| over all real tokens of all layers (per kind when per-kind targets are set)."""
    ctx = routing_context(model)
    cfg = cfg or ctx.cfg
    if not ctx.stats:
        raise RuntimeError("sparsity_loss needs a forward pass of the routed model first")
    sums = {kind: sum(s[kind]["gate_sum"] for s in ctx.stats.values()) for kind in ("attn", "mlp")}
    counts = {kind: sum(s[kind]["valid"] for s in ctx.stats.values()).clamp_min(1) for kind in ("attn", "mlp")}
    target_attn, target_mlp = cfg.targets()
    if cfg.target_sparsity_attn is not None:
        loss = 0.5 * ((target_attn - sums["attn"] / counts["attn"]).abs()
                      + (target_mlp - sums["mlp"] / counts["mlp"]).abs())
    else:
        mean = (sums["attn"] + sums["mlp"]) / (counts["attn"] + counts["mlp"])
        loss = (target_attn - mean).abs()
    return cfg.alpha * loss


def router_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router weights keyed by layer index, independent of wrappers: layers.{i}.{attn|mlp}_router.{param}."""
    state = {}
    for idx, layer in enumerate(routed_layers(model)):
        for name in ROUTER_NAMES:
            kind = name.replace("skipgpt_", "")
            for pname, tensor in getattr(layer, name).state_dict().items():
                state[f"layers.{idx}.{kind}.{pname}"] = tensor.detach().to("cpu").contiguous()
    return state


def save_routers(model: nn.Module, path: str | os.PathLike) -> None:
    """Routers and their config in one safetensors file (written atomically)."""
    ctx = routing_context(model)
    state = router_state_dict(model)
    meta = {"skipgpt_router_config": json.dumps(ctx.cfg.to_dict()), "num_layers": str(len(routed_layers(model))),
            "hidden_size": str(_base_model(model).config.hidden_size)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_routers(model: nn.Module, path: str | os.PathLike) -> RouterConfig:
    """Load router weights saved by save_routers; the model's shape must match. Returns the saved config."""
    path = Path(path)
    if not path.is_file():
        raise SkipGPTError(f"router file {path} does not exist: give the routers.safetensors of a checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            saved = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises several types for a bad header
        raise SkipGPTError(f"router file {path} is not a readable safetensors file ({err}): re-export it") from err
    layers = routed_layers(model)
    hidden = _base_model(model).config.hidden_size
    if meta.get("num_layers") != str(len(layers)) or meta.get("hidden_size") != str(hidden):
        raise SkipGPTError(f"router file {path} is for a model with {meta.get('num_layers')} layers and hidden size "
                           f"{meta.get('hidden_size')}, but this model has {len(layers)} layers and hidden size "
                           f"{hidden}: load the routers trained for this model")
    own = router_state_dict(model)
    if set(own) != set(saved) or any(own[k].shape != saved[k].shape for k in own):
        raise SkipGPTError(f"router file {path} holds routers of another type or shape: attach routers with the "
                           "router config it was trained with")
    for idx, layer in enumerate(layers):
        for name in ROUTER_NAMES:
            kind = name.replace("skipgpt_", "")
            module = getattr(layer, name)
            prefix = f"layers.{idx}.{kind}."
            module.load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})
    return RouterConfig.from_dict(json.loads(meta["skipgpt_router_config"]))


def count_router_parameters(model: nn.Module) -> int:
    return sum(p.numel() for _, p in router_parameters(model))
