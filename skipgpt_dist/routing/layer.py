"""The routed decoder block: h_out[t] = h_in[t] + g[t] * f(h_in)[t] for attention, then for the MLP.

`mask` runs f on every token and multiplies by g (the reference). `capacity` and `expert_choice` gather the
chosen tokens into k = ceil(capacity * S) static slots per sequence, run f on the slots only and scatter the
results back, so compute follows the routers while every shape depends only on (B, S) and the config.
At inference (`capacity`, nothing recorded by autograd, `inference_slots=dynamic`) k is instead the busiest row's
number of executed tokens, and a sublayer that no token executes does not run: equal to `mask`, with no padding
slot work (at batch-1 decode a skipped sublayer costs nothing).
The family's math (projections, norms, RoPE, MLP) comes from its adapter (adapters.py); each attention call's key
layout and back end are decided once, in one AttentionSpec (attention_spec.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .adapters import AttentionShape, FamilyAdapter
from .attention_spec import attention_spec, detached, keys_with_cache, run_attention
from .cache import RoutedCacheLayer, routed_cache_layer
from .context import RoutingContext, TokenLayout, host_reads_free
from .gates import (Gates, capacity_slots, draw_gates, hashed_uniform_from_base, select_slots,
                    select_slots_with_probes)
from .moe import record_moe_rows
from .slots import flat_index, gather_tokens, row_or_spare, scatter_add_tokens, spare_row_buffer

ATTN, MLP = 0, 1


@dataclass
class LayerRouting:
    """Static facts about one routed layer (not a Module: holds no parameters)."""

    layer_idx: int
    adapter: FamilyAdapter
    shape: AttentionShape
    window: Optional[int]
    scale: float
    ctx: RoutingContext
    softcap: Optional[float] = None  # attention logit soft-capping (Gemma 2)

    def __post_init__(self):
        # the context sizes its per-forward noise table (one entry per layer and kind) from this
        self.ctx.num_layers = max(self.ctx.num_layers, self.layer_idx + 1)


@dataclass
class Plan:
    """Which tokens a sublayer runs on. idx/real are None in mask mode (every token runs)."""

    gates: Gates
    executed_tokens: Optional[torch.Tensor]  # (B, S) bool after capacity; None: made from the slots when asked
    idx: Optional[torch.Tensor] = None  # (B, k) token index of each slot
    real: Optional[torch.Tensor] = None  # (B, k) slot holds a token (else padding, discarded)
    all_executed: bool = False  # dynamic slots: every token executes and nothing records autograd (gate == 1)
    empty: bool = False  # dynamic slots: no token executes, the sublayer does not run
    decided: Optional[torch.Tensor] = None  # () number of tokens the router chose, when already known
    # gate_grad=probe: (B, k) slot holds a sampled skipped token (run for the gradient, added with gate value 0)
    # and (B, 1) the weight of its straight-through gradient (skipped tokens per probe in the row)
    probe: Optional[torch.Tensor] = None
    probe_weight: Optional[torch.Tensor] = None

    @property
    def used(self) -> Optional[torch.Tensor]:
        """(B, k) slots whose output is scattered back: executed tokens, and probes (whose value added is 0)."""
        return self.real if self.probe is None else self.real | self.probe

    @property
    def executed(self) -> torch.Tensor:
        """(B, S) bool: the tokens that run the sublayer. For static slots it is built only when asked (the
        straight-through gradient, kv_policy=routed masks): an eval forward under kv_policy=all never needs it."""
        if self.executed_tokens is None:
            self.executed_tokens = torch.zeros_like(self.gates.hard).scatter(1, self.idx, self.real)
        return self.executed_tokens


class RoutedLayerMixin:
    """Mixed into the HF decoder-layer class by attach_routers; replaces only forward."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        return routed_block(self, hidden_states, position_embeddings, cache)


def routed_block(layer: nn.Module, h: torch.Tensor, position_embeddings, cache) -> torch.Tensor:
    """Host-side bookkeeping (per-forward caches, the KV cache, statistics), then the block's tensor work:
    routed_compute, or its compiled copy (training/compile.py) where shapes do not depend on data."""
    r: LayerRouting = layer._skipgpt
    ctx = r.ctx
    batch, seq_len, _ = h.shape
    cache_layer = routed_cache_layer(cache, r.layer_idx) if cache is not None else None
    past = cache_layer.seen if cache_layer is not None else 0
    dynamic = dynamic_inference(ctx.cfg, layer.training)
    compiled = layer.__dict__.get("_skipgpt_compiled")
    # Compiled code runs without a KV cache (its appends are host state: lengths, buffers) and with static slots
    compiled = compiled if compiled is not None and cache_layer is None and not dynamic else None
    # Host reads where they are free (CPU eager) or where the path reads decisions on the host anyway (dynamic
    # inference slots); never on a GPU otherwise, nor in compiled code.
    host_reads = compiled is None and (dynamic or host_reads_free(h.device))
    layout = ctx.token_layout(batch, seq_len, past, h.device, host_reads)
    if compiled is not None:
        layout.all_valid  # noqa: B018 (cached before tracing: without host reads it reads no tensor)
    if cache_layer is not None:
        cache_layer.host_reads = host_reads
    cos, sin = ctx.rope_tables(position_embeddings, batch)
    noise_key = None
    if layer.training and ctx.enabled and (ctx.noisy or probing(ctx.cfg)):
        ids, bases = ctx.noise_inputs(batch, h.device)
        noise_key = (ids, bases[r.layer_idx])
    # Compiled code takes the temperature as a tensor: a float would be a constant, recompiled when it anneals
    temperature = float(ctx.temperature) if compiled is None else ctx.temperature_tensor(h.device)
    out, stats = (compiled or routed_compute)(layer, h, layout, cos, sin, cache_layer, noise_key, temperature)
    ctx.stats[r.layer_idx] = stats
    return out


def routed_compute(layer: nn.Module, h: torch.Tensor, layout: TokenLayout, cos, sin,
                   cache_layer: Optional[RoutedCacheLayer], noise_key, temperature):
    """The routed block's tensor work: (output, statistics). noise_key: (sample ids (B,), noise bases (2,)) of
    this layer on h's device (RoutingContext.noise_inputs), None without Gumbel noise; temperature: a float or a
    0-d tensor. Reads nothing on the host unless layout.host_reads."""
    r: LayerRouting = layer._skipgpt
    ctx = r.ctx
    decoding = cache_layer is not None and cache_layer.seen > 0
    attn_router, mlp_router = layer.skipgpt_attn_router, layer.skipgpt_mlp_router
    scale = attn_router.input_scale(h)  # both routers read h by default: one RMS for the two
    attn_plan = plan_sublayer(attn_router(h, scale), layout, r, ATTN, layer.training, decoding, h,
                              noise_key=noise_key, temperature=temperature)
    h_mid = attention_sublayer(layer, r, h, attn_plan, layout, cos, sin, cache_layer)
    mlp_logits = mlp_router(h, scale) if ctx.cfg.mlp_router_input == "block_input" else mlp_router(h_mid)
    mlp_plan = plan_sublayer(mlp_logits, layout, r, MLP, layer.training, decoding, h_mid,
                             noise_key=noise_key, temperature=temperature)
    # h_mid is h itself when no token executed attention: then it is the caller's tensor, not ours to update
    out = mlp_sublayer(layer, r, h_mid, mlp_plan, h_is_scratch=h_mid is not h)
    return out, block_stats(layout.valid, layout.count, attn_plan, mlp_plan)


def probing(cfg) -> bool:
    """The estimator samples skipped tokens into free slots (gate_grad=probe; training with static slots)."""
    return cfg.gate_grad == "probe" and cfg.mode == "capacity"


def dynamic_inference(cfg, training: bool) -> bool:
    """The block will (most likely) size slots from the data: capacity mode, dynamic inference slots, nothing
    recorded by autograd (dynamic_slots decides per sublayer; this is the block-level expectation)."""
    return (cfg.mode == "capacity" and cfg.inference_slots == "dynamic" and not training
            and not torch.is_grad_enabled())


def plan_sublayer(logits, layout: TokenLayout, r: LayerRouting, kind: int, training: bool, decoding: bool,
                  x: Optional[torch.Tensor] = None, noise_key=None, temperature=None) -> Plan:
    """x: the sublayer's input; when autograd records it (or the logits), slots stay static.
    noise_key: (sample ids, per-kind noise bases) of this layer for Gumbel noise (training), or None.
    temperature: the Gumbel temperature (default: the context's)."""
    ctx, cfg = r.ctx, r.ctx.cfg
    valid, positions = layout.valid, layout.positions
    if not ctx.enabled:
        gates = Gates(hard=valid, score=valid.float(), soft=None)
        return Plan(gates=gates, executed_tokens=valid)
    dynamic = cfg.mode == "capacity" and dynamic_slots(cfg.inference_slots, training, logits, x)
    # probes only help a router that learns: training, static slots, router logits recorded by autograd
    probe = training and probing(cfg) and torch.is_grad_enabled() and logits.requires_grad
    if training and (ctx.noisy or probe) and noise_key is None:  # (a caller outside routed_block)
        ids, bases = ctx.noise_inputs(valid.shape[0], valid.device)
        noise_key = (ids, bases[r.layer_idx])
    noise = probe_key = None
    if training and (ctx.noisy or probe):
        uniform = hashed_uniform_from_base(noise_key[1][kind], noise_key[0], positions, channels=3 if probe else 2)
        noise = uniform[..., :2] if ctx.noisy else None
        probe_key = uniform[..., 2] if probe else None
    temperature = ctx.temperature if temperature is None else temperature
    if dynamic and logits.shape[:2] == (1, 1) and layout.all_valid:
        return single_token_plan(logits, layout)
    # (without a padding mask every token is valid, known without looking at the data)
    gates = draw_gates(logits, valid, temperature, noise, not layout.masked or (dynamic and layout.all_valid))
    if cfg.mode == "mask":
        return Plan(gates=gates, executed_tokens=gates.hard)
    if dynamic:
        return dynamic_plan(gates)
    k = capacity_slots(valid.shape[1], cfg.capacity_for(kind, r.layer_idx))
    if probe_key is not None:
        idx, real, probe_slots, weight = select_slots_with_probes(gates.hard, valid, gates.score, probe_key, k)
        return Plan(gates=gates, executed_tokens=None, idx=idx, real=real, probe=probe_slots, probe_weight=weight)
    # expert_choice is non-causal (top-k over the whole sequence); at token-by-token decode it falls back to
    # the causal threshold decision with a one-slot capacity.
    candidates = valid if cfg.mode == "expert_choice" and not decoding else gates.hard
    idx, real = select_slots(candidates, gates.score, k)
    plan = Plan(gates=gates, executed_tokens=None, idx=idx, real=real)
    if cfg.mode == "expert_choice":
        plan.gates = Gates(hard=plan.executed, score=gates.score, soft=gates.soft)
    return plan


def dynamic_slots(inference_slots: str, training: bool, logits: torch.Tensor, x: Optional[torch.Tensor]) -> bool:
    """Data-dependent slot counts only at inference: training (and anything autograd records) keeps static
    shapes, so that every rank runs every sublayer with the same shapes."""
    if training or inference_slots != "dynamic":
        return False
    return not (torch.is_grad_enabled() and (logits.requires_grad or (x is not None and x.requires_grad)))


def dynamic_plan(gates: Gates) -> Plan:
    """Slots for exactly the executed tokens: k = the busiest row's count, so nothing overflows (== mask).

    Every token executes: no slots (the sublayer runs densely, as in mask mode). None does: zero slots (skipped).
    """
    hard = gates.hard
    low, high = (int(v) for v in torch.aminmax(hard.sum(dim=1)))
    if low == hard.shape[1]:
        return Plan(gates=gates, executed_tokens=hard, all_executed=True)
    if high == 0:
        return Plan(gates=gates, executed_tokens=hard, empty=True)
    # Executed tokens first, in original order (a stable sort of the decisions); the rest of a row's k slots
    # are padding (its tokens, never executed, are discarded by the scatter).
    real, idx = torch.sort(hard.view(torch.uint8), dim=1, descending=True, stable=True)
    return Plan(gates=gates, executed_tokens=hard, idx=idx[:, :high], real=real[:, :high].bool())


def single_token_plan(logits: torch.Tensor, layout: TokenLayout) -> Plan:
    """Dynamic slots for one real token (batch-1 decode): its decision read on the host from its two logits.

    Same decision as draw_gates (execute iff logit_execute > logit_skip, in fp32) with one sync and no tensor
    op: at decode every small op per layer counts, and the sublayer then either runs densely or not at all.
    """
    execute, skip = logits.tolist()[0][0]  # exact values in any float dtype
    if execute > skip:
        gates = Gates(hard=layout.valid, score=None, soft=None)
        return Plan(gates=gates, executed_tokens=layout.valid, all_executed=True, decided=layout.count)
    gates = Gates(hard=layout.no_tokens, score=None, soft=None)
    return Plan(gates=gates, executed_tokens=layout.no_tokens, empty=True, decided=layout.zero)


def attention_sublayer(layer, r: LayerRouting, h, plan: Plan, layout: TokenLayout, cos, sin,
                       cache_layer: Optional[RoutedCacheLayer]) -> torch.Tensor:
    ad, shape, cfg = r.adapter, r.shape, r.ctx.cfg
    attn, norm = getattr(layer, ad.attn), getattr(layer, ad.attn_norm)
    routed_kv = cfg.kv_policy == "routed"
    valid, positions = layout.valid, layout.positions
    if plan.empty:
        skipped_attention(layer, r, h, layout, cos, sin, cache_layer)
        return h
    if plan.idx is None:
        x = norm(h)
        x_q, q_pos, q_cos, q_sin = x, positions, cos, sin
    else:
        x = None if routed_kv else norm(h)
        # kv_policy=all normalises every token for K/V anyway: the queries' rows are a gather of it (norms are
        # per token), not a second norm.
        x_q = norm(gather_tokens(h, plan.idx)) if x is None else gather_tokens(x, plan.idx)
        q_pos = positions.gather(1, plan.idx)
        q_cos, q_sin = gather_tokens(cos[:, 0], plan.idx)[:, None], gather_tokens(sin[:, 0], plan.idx)[:, None]
    compacted = routed_kv and plan.idx is not None
    if compacted or plan.idx is None:  # queries and keys come from the same rows: one (maybe fused) projection
        q, k, v = ad.qkv(attn, x_q, shape)
        k_pos, k_cos, k_sin = q_pos, q_cos, q_sin
        keep = plan.real if compacted else plan.executed if routed_kv else valid
    else:
        q, k, v = ad.q_at_slots(attn, x, x_q, plan.idx, shape)
        k_pos, k_cos, k_sin, keep = positions, cos, sin, valid
    q, k = ad.rope(q, q_cos, q_sin), ad.rope(k, k_cos, k_sin)
    # kv_policy=all, no padding, nothing cached before this chunk: the keys are exactly positions 0..S-1, all valid
    prefix = not routed_kv and (cache_layer is None or cache_layer.seen == 0) and layout.all_valid
    all_kept = cache_layer is not None and layout.all_valid and (not routed_kv or plan.all_executed)
    keys = keys_with_cache(cache_layer, k, v, k_pos, keep, h.shape[1], all_kept, r.window)
    # a static query count: every token (S) or the static k slots, not a data-dependent dynamic-slot count
    static_queries = plan.idx is None or plan.idx.shape[1] == capacity_slots(h.shape[1],
                                                                            cfg.capacity_for(ATTN, r.layer_idx))
    spec = attention_spec(cfg.attn_backend, q, r.window, r.scale, r.softcap, compacted=compacted,
                          has_cache=cache_layer is not None, static_queries=static_queries, prefix=prefix,
                          open_keys=keys.open_keys)
    out = run_attention(spec, q, keys, q_pos, plan.real, r.ctx.layouts)
    out = out.transpose(1, 2).reshape(*x_q.shape[:2], shape.heads * shape.head_dim)
    return combine(h, ad.attn_out(layer, out), plan, cfg.gate_grad == "dense")


def skipped_attention(layer, r: LayerRouting, h, layout: TokenLayout, cos, sin,
                      cache_layer: Optional[RoutedCacheLayer]) -> None:
    """Attention that no token executes. Without a cache nothing is needed: no query here, and this forward's
    later tokens read this layer's keys only through their own queries. With a cache, kv_policy=all still stores
    every token's key/value (later queries attend them); kv_policy=routed stores nothing."""
    if cache_layer is None:
        return
    if r.ctx.cfg.kv_policy == "routed":
        cache_layer.advance(h.shape[1])
        return
    ad = r.adapter
    k, v = ad.kv(getattr(layer, ad.attn), getattr(layer, ad.attn_norm)(h), r.shape)
    cache_layer.append(detached(ad.rope(k, cos, sin)), detached(v), layout.positions, layout.valid,
                       new_tokens=h.shape[1], all_kept=layout.all_valid)


def mlp_sublayer(layer, r: LayerRouting, h, plan: Plan, h_is_scratch: bool) -> torch.Tensor:
    """h_is_scratch: h is this block's own post-attention tensor, used by nothing after the MLP, so without
    autograd the MLP output can be added into it in place."""
    if plan.empty:
        return h
    x = h if plan.idx is None else gather_tokens(h, plan.idx)
    if r.adapter.moe_router is not None:  # which rows reached the experts (for the aux loss): see moe.py
        record_moe_rows(r.ctx, r.layer_idx, plan)
    return combine(h, r.adapter.mlp_forward(layer, x), plan, r.ctx.cfg.gate_grad == "dense",
                   h_is_scratch=h_is_scratch)


def combine(h, out, plan: Plan, dense_grad: bool, h_is_scratch: bool = False) -> torch.Tensor:
    """h + g * f, with f given on every token (mask mode) or on the slots (scattered back).

    h_is_scratch: the caller owns h and never reads it again, so when autograd is not recording it is updated in
    place (no copy of the whole (B, S, d) tensor).
    """
    # (not in compiled code: it plans its own buffers, and spare_row_buffer's storage checks do not trace)
    in_place = h_is_scratch and h.is_contiguous() and not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (h.requires_grad or out.requires_grad))
    if plan.all_executed:  # every gate is 1 and carries no gradient
        return h.add_(out) if in_place else h + out
    if plan.idx is None:
        mult = plan.gates.straight_through(plan.executed, dense_grad)
        return h + out * mult[..., None].to(out.dtype)
    # Real slots hold executed tokens, whose multiplier is exactly 1 in value: multiply only to carry the
    # straight-through gradient.
    soft = plan.gates.soft
    if soft is not None and soft.requires_grad:
        mult = plan.gates.straight_through(plan.executed, dense_grad).gather(1, plan.idx)
        if plan.probe is not None:  # value 0 (the probe adds nothing), gradient <dL/dh, f> x weight
            surrogate = (soft - soft.detach()).gather(1, plan.idx)
            mult = mult + surrogate * (plan.probe * plan.probe_weight)
        out = out * mult[..., None].to(out.dtype)
    used = plan.used
    if in_place:
        batch, seq_len, dim = h.shape
        rows = out.reshape(-1, dim)
        buffer = spare_row_buffer(h)
        if buffer is not None:  # padding slots add into the spare row: no masking pass over the rows
            buffer.index_add_(0, row_or_spare(plan.idx, used, seq_len), rows)
        else:
            rows = torch.where(used.reshape(-1, 1), rows, torch.zeros((), dtype=out.dtype, device=out.device))
            h.view(batch * seq_len, dim).index_add_(0, flat_index(plan.idx, seq_len), rows)
        return h
    return scatter_add_tokens(h, plan.idx, out, used)


def block_stats(valid, count, attn_plan: Plan, mlp_plan: Plan) -> dict:
    """Per-kind statistics of one block (tensors: the caller stores them in the context)."""
    return {"attn": _sublayer_stats(attn_plan, valid, count), "mlp": _sublayer_stats(mlp_plan, valid, count)}


def _sublayer_stats(p: Plan, valid, count) -> dict:
    # As few ops as possible (they run per layer at every decode step): a count is reused where two coincide.
    decided = p.decided if p.decided is not None else p.gates.hard.sum()
    # Without slots the executed tokens are the decided ones; slots hold distinct tokens, the real ones executed.
    executed = decided if p.idx is None else p.real.sum()
    if p.gates.soft is None:  # no straight-through gradient: the regulariser's gate is the decision itself
        gate_sum = decided
    else:  # keeps the ST gradient for the sparsity loss
        gate_sum = (p.gates.regulariser_gate() * valid).sum()
    return {"gate_sum": gate_sum, "decided": decided, "executed": executed, "valid": count}
