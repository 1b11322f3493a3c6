"""torch.compile of the routed decoder blocks (parallel.compile), applied in one place.

Each routed layer gets a compiled copy of its tensor work (routing.layer.routed_compute), as torchtitan compiles
each transformer block: small graphs that compile once and suit FSDP2's per-block hooks and activation
checkpointing. The block's host-side bookkeeping stays eager: per-forward caches, the KV cache, statistics, and the
values that change every step (the Gumbel noise step, the temperature) enter the graph as data, so a step does not
recompile. Compiled code runs where shapes do not depend on data: training, and inference with static slots
(routers.inference_slots=static) without a KV cache; dynamic inference slots and cached decode stay eager.

Call compile_model(model, cfg) after routers (and LoRA) are attached and after activation checkpointing and
sharding are applied (FSDP2: at the end of apply_fsdp2; DeepSpeed: before deepspeed.initialize), before the first
forward.
"""
from __future__ import annotations

import torch
from torch import nn

from ..routing import routed_layers
from ..routing.layer import routed_compute


def compile_model(model: nn.Module, cfg) -> nn.Module:
    """Compile every routed block of model when cfg.parallel.compile is set; returns model (changed in place).

    Not fullgraph: a path that needs a host value (flash-attn varlen's max length, expert_choice's fallbacks) then
    splits its graph instead of failing; the CPU paths and the sdpa/flex paths compile whole (tests/test_sync_free).
    """
    if not cfg.parallel.compile:
        return model
    # One graph serves every layer (layers and their weights are inputs, not constants): a model compiles a graph
    # per state (train; layer 0, whose input needs no gradient; eval), not one per layer or per step.
    for layer in routed_layers(model):
        compile_layer(layer)
    return model


def compile_layer(layer: nn.Module, **compile_kwargs) -> None:
    """Give one routed layer a compiled routed_compute (routed_block calls it where shapes are static)."""
    layer.__dict__["_skipgpt_compiled"] = torch.compile(routed_compute, **compile_kwargs)


def uncompile_layer(layer: nn.Module) -> None:
    layer.__dict__.pop("_skipgpt_compiled", None)
