"""RouterConfig: how routers are built, how gates are drawn and how routed sublayers execute.

The semantics are those of ../shared/design.md section 1; this dataclass only names and validates them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..errors import SkipGPTError

ROUTER_TYPES = ("linear", "mlp")
MODES = ("mask", "capacity", "expert_choice")
KV_POLICIES = ("all", "routed")
MLP_ROUTER_INPUTS = ("block_input", "mlp_input")
ROUTER_INITS = ("margin", "block_influence")
ATTN_BACKENDS = ("auto", "sdpa", "flash", "flex")
GATE_GRADS = ("auto", "executed", "dense")
INFERENCE_SLOTS = ("dynamic", "static")


@dataclass
class RouterConfig:
    # Router architecture: `linear` = Linear(d, 2); `mlp` = d -> d/4 -> ReLU -> 2. Logits are [execute, skip].
    router_type: str = "linear"
    # Scale the router's input to unit RMS (parameter-free) so one learning rate suits every layer's routers.
    normalize_input: bool = True
    # `mask` runs everything and multiplies by the gate (reference); `capacity` really skips with static shapes;
    # `expert_choice` executes exactly the top-k tokens by router margin (non-causal, Mixture-of-Depths).
    mode: str = "capacity"
    # Fraction of each sequence's tokens that a routed sublayer can execute (k = ceil(capacity * S)).
    capacity: float = 1.0
    # `all`: skipped tokens still write K/V (paper). `routed`: skipped tokens write no K/V (Mixture-of-Depths).
    kv_policy: str = "all"
    temperature_start: float = 5.0
    temperature_end: float = 1.0
    # Target fraction of sublayer executions skipped, over all real tokens, layers and both kinds.
    target_sparsity: float = 0.25
    # Optional per-kind targets; when both are set they replace the global target.
    target_sparsity_attn: Optional[float] = None
    target_sparsity_mlp: Optional[float] = None
    alpha: float = 8.0
    # Initial router margin (execute logit - skip logit) of every token. Training samples hard gates, so a token
    # skips with probability sigmoid(-margin): 2 skips ~12% at random from the first step, which a small model
    # cannot absorb (SmolLM2-135M: loss 4 -> 7); 5 starts from a near-dense model (~0.7%).
    init_margin: float = 2.0
    # `margin`: every router starts at init_margin. `block_influence` (stage 1, parallel.backend=none): the
    # sublayers a ShortGPT block-influence ranking marks as least important (as many as the target sparsity)
    # start at init_skip_margin instead, so training refines a good static plan per token rather than
    # discovering from noise which sublayers matter (skipgpt_dist/static_pruning.py).
    init: str = "margin"
    init_skip_margin: float = -1.0
    mlp_router_input: str = "block_input"
    attn_backend: str = "auto"
    # Where the straight-through gradient reaches the router. `executed`: only tokens that executed the sublayer
    # (the only estimator real skipping can compute, since a skipped sublayer has no output to differentiate);
    # `dense`: every token, as the paper's official code does (needs mode=mask); `auto`: dense under mode=mask,
    # executed otherwise.
    gate_grad: str = "auto"
    # mode=capacity when nothing records autograd (eval mode, no grad): `dynamic` sizes each sublayer's slots to
    # the busiest row's executed tokens (no overflow: equals mask; a sublayer no token executes does not run), which
    # reads the decisions on the host once per sublayer: the CPU choice. `static` keeps k = ceil(capacity * S) as
    # in training and never reads device values on the host (no GPU stall, CUDA-graph and torch.compile friendly;
    # the KV cache then keeps flagged entries instead of compacting them): the GPU choice. Not chosen by device
    # (no `auto`): static can overflow where dynamic cannot, so the device must not change a config's outputs.
    # Distributed evaluation forces static (see evaluate.py).
    inference_slots: str = "dynamic"

    def __post_init__(self):
        self.validate()

    def validate(self) -> "RouterConfig":
        _choice("router_type", self.router_type, ROUTER_TYPES)
        _choice("mode", self.mode, MODES)
        _choice("kv_policy", self.kv_policy, KV_POLICIES)
        _choice("mlp_router_input", self.mlp_router_input, MLP_ROUTER_INPUTS)
        _choice("attn_backend", self.attn_backend, ATTN_BACKENDS)
        _choice("gate_grad", self.gate_grad, GATE_GRADS)
        _choice("inference_slots", self.inference_slots, INFERENCE_SLOTS)
        if not isinstance(self.capacity, (int, float)) or not 0.0 < float(self.capacity) <= 1.0:
            raise SkipGPTError(f"routers.capacity={self.capacity!r} is out of range: use a number in (0, 1], "
                               "e.g. 0.75 for 25% skipping")
        for key in ("target_sparsity", "target_sparsity_attn", "target_sparsity_mlp"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= float(value) < 1.0:
                raise SkipGPTError(f"routers.{key}={value!r} is out of range: use a fraction in [0, 1)")
        if (self.target_sparsity_attn is None) != (self.target_sparsity_mlp is None):
            raise SkipGPTError("routers.target_sparsity_attn and routers.target_sparsity_mlp must be set together "
                               "(or neither, to use routers.target_sparsity)")
        for key in ("temperature_start", "temperature_end"):
            if float(getattr(self, key)) <= 0:
                raise SkipGPTError(f"routers.{key}={getattr(self, key)!r} must be > 0")
        _choice("init", self.init, ROUTER_INITS)
        for key, hint in (("init_margin", "e.g. 5 to start near dense"), ("init_skip_margin", "e.g. -1")):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not -20.0 <= float(value) <= 20.0:
                raise SkipGPTError(f"routers.{key}={value!r} is out of range: use a number in [-20, 20], {hint}")
        if float(self.alpha) < 0:
            raise SkipGPTError(f"routers.alpha={self.alpha!r} must be >= 0")
        if self.gate_grad == "auto":
            self.gate_grad = "dense" if self.mode == "mask" else "executed"
        if self.gate_grad == "dense" and self.mode != "mask":
            raise SkipGPTError("routers.gate_grad=dense needs the output of skipped sublayers, which only "
                               "routers.mode=mask computes: set mode=mask or gate_grad=executed")
        return self

    def targets(self) -> tuple[float, float]:
        """Target execute fractions (attention, MLP) = 1 - target sparsity."""
        if self.target_sparsity_attn is not None:
            return 1.0 - float(self.target_sparsity_attn), 1.0 - float(self.target_sparsity_mlp)
        return 1.0 - float(self.target_sparsity), 1.0 - float(self.target_sparsity)

    def with_execution(self, mode: Optional[str] = None, capacity: Optional[float] = None) -> "RouterConfig":
        """A copy that executes differently (e.g. routers trained with mode=mask, served with real skipping).

        The gradient estimator only matters while routers train; a mode other than mask gets `executed`.
        """
        data = self.to_dict()
        data["mode"] = mode if mode is not None else self.mode
        data["capacity"] = capacity if capacity is not None else self.capacity
        if data["mode"] != "mask":
            data["gate_grad"] = "executed"
        elif mode is not None and self.mode != "mask":
            data["gate_grad"] = "auto"
        return RouterConfig(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RouterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SkipGPTError(f"unknown router config key(s) {unknown}: valid keys are {sorted(known)}")
        return cls(**data)


def _choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise SkipGPTError(f"routers.{key}={value!r} is not supported: use one of {', '.join(allowed)}")
