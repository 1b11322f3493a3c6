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
GATE_GRADS = ("auto", "executed", "dense", "probe")
CAPACITY_PLANS = ("uniform", "warm_start")
KIND_NAMES = ("attn", "mlp")
CAPACITY_KEYS = ("capacity", "capacity_attn", "capacity_mlp", "layer_capacity")
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
    # Per-kind fractions (default: capacity). Attention is far more redundant than the MLP in most models, so one
    # global factor either wastes attention slots or forces MLP skips the model cannot afford.
    capacity_attn: Optional[float] = None
    capacity_mlp: Optional[float] = None
    # Per-layer fractions {"attn": [L values], "mlp": [L values]}: replaces the per-kind ones. Written by
    # capacity_plan=warm_start (or by hand); saved with the routers, so evaluation, export and the tools run
    # the shapes training ran. Static shapes stay a function of (B, S) and the config only.
    layer_capacity: Optional[dict] = None
    # `uniform`: every layer takes its kind's capacity. `warm_start` (with init=block_influence): the sublayers the
    # ranking marks for skipping get `marked_capacity` slots, the ones it keeps get 1.0 (they are expected to run
    # for nearly every token, and an overflow there is a forced skip of a sublayer the model needs).
    capacity_plan: str = "uniform"
    marked_capacity: float = 0.5
    # marked MLP sublayers (default: marked_capacity). 1.0 never forces an MLP skip: a small model loses far more
    # from a forced MLP skip than from an attention one, and its MLP routers learn to execute nearly everywhere.
    marked_capacity_mlp: Optional[float] = None
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
    # `margin`: every router starts at init_margin. `block_influence` (stage 1, fresh runs, any back end): the
    # sublayers a ShortGPT block-influence ranking marks as least important (as many as the target sparsity)
    # start at init_skip_margin instead, so training refines a good static plan per token rather than
    # discovering from noise which sublayers matter (skipgpt_dist/static_pruning.py).
    init: str = "margin"
    init_skip_margin: float = -1.0
    mlp_router_input: str = "block_input"
    attn_backend: str = "auto"
    # Where the straight-through gradient reaches the router. `executed`: only tokens that executed the sublayer
    # (the only estimator real skipping can compute, since a skipped sublayer has no output to differentiate);
    # `dense`: every token, as the paper's official code does (needs mode=mask). `probe` (real skipping): the slots
    # executed tokens leave free are filled with a random sample of the skipped tokens, whose sublayer output is
    # computed but added with gate value 0 (the forward is unchanged) and used only for the straight-through
    # gradient, weighted by 1/(sampled share): an unbiased estimate of the dense gradient at the cost of slots
    # that run anyway. `auto`: dense under mode=mask, probe under capacity, executed under expert_choice (its
    # slots are always full).
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
        for key in ("capacity", "capacity_attn", "capacity_mlp", "marked_capacity", "marked_capacity_mlp"):
            _check_fraction(key, getattr(self, key), optional=key not in ("capacity", "marked_capacity"))
        _choice("capacity_plan", self.capacity_plan, CAPACITY_PLANS)
        if self.capacity_plan == "warm_start" and self.init != "block_influence":
            raise SkipGPTError("routers.capacity_plan=warm_start plans slots from the block-influence warm start: "
                               "set routers.init=block_influence, or capacity_plan=uniform")
        self.layer_capacity = _checked_layer_capacity(self.layer_capacity)
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
            self.gate_grad = {"mask": "dense", "capacity": "probe"}.get(self.mode, "executed")
        if self.gate_grad == "dense" and self.mode != "mask":
            raise SkipGPTError("routers.gate_grad=dense needs the output of skipped sublayers, which only "
                               "routers.mode=mask computes: set mode=mask, or gate_grad=probe for real skipping")
        if self.gate_grad == "probe" and self.mode == "mask":
            raise SkipGPTError("routers.gate_grad=probe samples skipped tokens into free capacity slots, which "
                               "mode=mask does not have: use gate_grad=dense (mask) or mode=capacity")
        return self

    def warm_start_fractions(self) -> tuple[float, Optional[float]]:
        """(attention, MLP) fractions of sublayers the block-influence warm start marks; (f, None) with one global
        target: a fraction f of all 2L sublayers, ranked together."""
        if self.target_sparsity_attn is not None:
            return float(self.target_sparsity_attn), float(self.target_sparsity_mlp)
        return float(self.target_sparsity), None

    def marked_capacities(self) -> tuple[float, float]:
        """(attention, MLP) slot fractions of the sublayers capacity_plan=warm_start marks."""
        mlp = self.marked_capacity_mlp if self.marked_capacity_mlp is not None else self.marked_capacity
        return float(self.marked_capacity), float(mlp)

    def capacity_for(self, kind: int, layer: int) -> float:
        """Slot fraction of one routed sublayer (kind 0 = attention, 1 = MLP) of layer `layer`."""
        if self.layer_capacity is not None:
            return float(self.layer_capacity[KIND_NAMES[kind]][layer])
        per_kind = self.capacity_attn if kind == 0 else self.capacity_mlp
        return float(per_kind if per_kind is not None else self.capacity)

    def mean_capacity(self, num_layers: int) -> tuple[float, float]:
        """Mean slot fraction per kind (attention, MLP) over the layers: the compute a training step pays for."""
        return tuple(sum(self.capacity_for(kind, i) for i in range(num_layers)) / max(num_layers, 1)
                     for kind in (0, 1))

    def targets(self) -> tuple[float, float]:
        """Target execute fractions (attention, MLP) = 1 - target sparsity."""
        if self.target_sparsity_attn is not None:
            return 1.0 - float(self.target_sparsity_attn), 1.0 - float(self.target_sparsity_mlp)
        return 1.0 - float(self.target_sparsity), 1.0 - float(self.target_sparsity)

    def with_execution(self, mode: Optional[str] = None, capacity: Optional[float] = None) -> "RouterConfig":
        """A copy that executes differently (e.g. routers trained with mode=mask, served with real skipping).

        A capacity given here is one fraction for every sublayer: it replaces per-kind and per-layer capacities.
        The gradient estimator only matters while routers train; a changed mode gets its `auto` estimator.
        """
        data = self.to_dict()
        data["mode"] = mode if mode is not None else self.mode
        if capacity is not None:
            data.update(capacity=capacity, capacity_attn=None, capacity_mlp=None, layer_capacity=None,
                        capacity_plan="uniform")
        if data["mode"] != self.mode:
            data["gate_grad"] = "auto"
        return RouterConfig(**data)

    def sets_capacity(self) -> bool:
        """Whether this config asks for slots of its own (a stage-2 config that does not keeps stage 1's plan)."""
        return (self.layer_capacity is not None or self.capacity_attn is not None or self.capacity_mlp is not None
                or float(self.capacity) < 1.0)

    def with_capacities_of(self, other: "RouterConfig") -> "RouterConfig":
        """A copy with the slot fractions (global, per kind, per layer) of `other`."""
        data = self.to_dict()
        for key in CAPACITY_KEYS:
            data[key] = getattr(other, key)
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


def _check_fraction(key: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise SkipGPTError(f"routers.{key}={value!r} is out of range: use a number in (0, 1], "
                           "e.g. 0.75 for 25% skipping")


def _checked_layer_capacity(value) -> Optional[dict]:
    """None, or {"attn": [fractions], "mlp": [fractions]} of equal length (the layer count is checked when the
    routers are attached to a model)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(KIND_NAMES):
        raise SkipGPTError(f"routers.layer_capacity must map attn and mlp to per-layer lists, got {value!r}: e.g. "
                           "{attn: [1.0, 0.5, ...], mlp: [1.0, 1.0, ...]}, or leave it unset")
    lists = {kind: list(value[kind]) if isinstance(value[kind], (list, tuple)) else None for kind in KIND_NAMES}
    if any(v is None or not v for v in lists.values()) or len(lists["attn"]) != len(lists["mlp"]):
        raise SkipGPTError("routers.layer_capacity.attn and .mlp must be non-empty lists of the same length "
                           "(one fraction per layer)")
    for kind, values in lists.items():
        for i, v in enumerate(values):
            _check_fraction(f"layer_capacity.{kind}[{i}]", v)
    return {kind: [float(v) for v in values] for kind, values in lists.items()}


def _choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise SkipGPTError(f"routers.{key}={value!r} is not supported: use one of {', '.join(allowed)}")
