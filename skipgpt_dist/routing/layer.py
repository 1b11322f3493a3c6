"""The routed decoder block: h_out[t] = h_in[t] + g[t] * f(h_in)[t] for attention, then for the MLP.

`mask` runs f on every token and multiplies by g (the reference). `capacity` and `expert_choice` gather the
chosen tokens into k = ceil(capacity * S) static slots per sequence, run f on the slots only and scatter the
results back, so compute follows the routers while every shape depends only on (B, S) and the config.
At inference (`capacity`, nothing recorded by autograd, `inference_slots=dynamic`) k is instead the busiest row's
number of executed tokens, and a sublayer that no token executes does not run: equal to `mask`, with no padding
slot work (at batch-1 decode a skipped sublayer costs nothing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .adapters import AttentionShape, FamilyAdapter, apply_rope
from .attention import (choose_backend, flash_attn_available, flash_varlen_attention, flex_attention_available,
                        flex_attention_call, sdpa_attention, sdpa_prefix_attention, sdpa_unmasked)
from .cache import RoutedCacheLayer, routed_cache_layer
from .context import RoutingContext, TokenLayout, host_reads_free
from .gates import (Gates, capacity_slots, draw_gates, hashed_uniform_from_base, select_slots,
                    select_slots_with_probes)

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


def _flat_index(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, k) token indices -> (B*k,) row indices into the (B*S, ...) flattened tensor."""
    if idx.shape[0] == 1:
        return idx.reshape(-1)
    offsets = torch.arange(idx.shape[0], device=idx.device)[:, None] * seq_len
    return (idx + offsets).reshape(-1)


def _row_or_spare(idx: torch.Tensor, real: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B*k,) row of each slot in the flattened (B*S + 1, ...) buffer of scatter_add_tokens: its token's row, or the
    spare row B*S for a padding slot."""
    return torch.where(real.reshape(-1), _flat_index(idx, seq_len), idx.shape[0] * seq_len)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # Row-wise index_select on the flattened tensor: ~10x faster on CPU than gather with an index expanded
    # over the hidden dimension (forward and backward), same values.
    batch, seq_len = x.shape[:2]
    rows = x.reshape(batch * seq_len, *x.shape[2:]).index_select(0, _flat_index(idx, seq_len))
    return rows.view(batch, idx.shape[1], *x.shape[2:])


def scatter_add_tokens(h: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """h with rows (B, k, d) added at token indices idx (B, k; distinct per row) where real (B, k) is set.

    Rows of padding slots (real False) are added to a scratch row that is dropped, so whatever they hold never
    reaches h (and they get zero gradient), without a masking pass over the rows. The result is the first B*S rows
    of that (B*S + 1)-row buffer (spare_row_buffer finds it again for the in-place MLP combine).
    """
    batch, seq_len, dim = h.shape
    n = batch * seq_len
    out = torch.cat([h.reshape(n, dim), h.new_zeros(1, dim)]).index_add_(0, _row_or_spare(idx, real, seq_len),
                                                                          rows.reshape(-1, dim))
    return out[:n].view(batch, seq_len, dim)


def project_heads(linear: nn.Module, x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    out = linear(x)
    return out.view(*x.shape[:2], heads, head_dim).transpose(1, 2)


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
    q = apply_rope(project_heads(getattr(attn, ad.q_proj), x_q, shape.heads, shape.head_dim), q_cos, q_sin)
    if routed_kv and plan.idx is not None:
        x_kv, k_pos, k_cos, k_sin, keep = x_q, q_pos, q_cos, q_sin, plan.real
    else:
        x_kv, k_pos, k_cos, k_sin = x, positions, cos, sin
        keep = plan.executed if routed_kv else valid
    k = apply_rope(project_heads(getattr(attn, ad.k_proj), x_kv, shape.kv_heads, shape.head_dim), k_cos, k_sin)
    v = project_heads(getattr(attn, ad.v_proj), x_kv, shape.kv_heads, shape.head_dim)
    compacted = routed_kv and plan.idx is not None
    # a static query count: every token (S) or the static k slots, not a data-dependent dynamic-slot count
    static_queries = plan.idx is None or plan.idx.shape[1] == capacity_slots(h.shape[1],
                                                                            cfg.capacity_for(ATTN, r.layer_idx))
    backend = resolve_backend(cfg.attn_backend, compacted, q, r.window, cache_layer is not None, static_queries)
    all_kept = cache_layer is not None and layout.all_valid and (not routed_kv or plan.all_executed)
    # kv_policy=all, no padding, nothing cached before this chunk: the keys are exactly positions 0..S-1, all valid
    prefix_keys = not routed_kv and (cache_layer is None or cache_layer.seen == 0) and layout.all_valid
    keys, values, key_pos, key_valid, open_keys = with_cache(cache_layer, r, k, v, k_pos, keep, h.shape[1],
                                                             all_kept, backend == "sdpa",
                                                             backend == "flex" or not prefix_keys)
    # (flash packs only these queries: under kv_policy=routed its probes get no output, so no gradient signal)
    out = run_attention(backend, q, keys, values, q_pos, key_pos, key_valid, r, compacted, plan.real, open_keys,
                        prefix_keys)
    out = out.transpose(1, 2).reshape(*x_q.shape[:2], shape.heads * shape.head_dim)
    return combine(h, getattr(attn, ad.o_proj)(out), plan, cfg.gate_grad == "dense")


def with_cache(cache_layer: Optional[RoutedCacheLayer], r: LayerRouting, k, v, k_pos, keep, new_tokens: int,
               all_kept: bool, maskless_ok: bool, positions_needed: bool = True):
    """(keys, values, key_pos, key_valid, open_keys): this chunk's keys/values after the cached ones.

    open_keys: one new token per row over a cache of only valid entries, all inside the window, so every key is
    allowed (the decode case); with maskless_ok (SDPA serves) positions and flags are then not even fetched.
    positions_needed=False: the attention call will not read them either (prefix keys), so the cache's implied
    positions and flags are not built.
    """
    if cache_layer is None:
        return k, v, k_pos, keep, False
    past = cache_layer.past() if k.requires_grad else None
    cache_layer.append(_detached(k), _detached(v), k_pos, keep, new_tokens=new_tokens, all_kept=all_kept)
    open_keys = new_tokens == 1 and cache_layer.all_valid and (r.window is None or cache_layer.seen <= r.window)
    if past is not None:  # autograd records this chunk's keys: attend them, not the cache's detached copy
        return (torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2), torch.cat([past[2], k_pos], dim=1),
                torch.cat([past[3], keep], dim=1), open_keys)
    if k.requires_grad or cache_layer.keys.shape[2] == 0:
        # (an empty cache: no row kept a key yet, e.g. mask mode; the chunk's rows are then opened by allowed_mask)
        return k, v, k_pos, keep, open_keys
    # The cache (appended first) already holds the past and this chunk, minus entries never attended: no copy.
    if (open_keys and maskless_ok) or not positions_needed:
        return cache_layer.keys, cache_layer.values, None, None, open_keys
    return cache_layer.keys, cache_layer.values, cache_layer.key_pos, cache_layer.key_valid, open_keys


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad else t  # (no alias op when there is nothing to detach)


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
    ad, shape = r.adapter, r.shape
    attn, x = getattr(layer, ad.attn), getattr(layer, ad.attn_norm)(h)
    k = apply_rope(project_heads(getattr(attn, ad.k_proj), x, shape.kv_heads, shape.head_dim), cos, sin)
    v = project_heads(getattr(attn, ad.v_proj), x, shape.kv_heads, shape.head_dim)
    cache_layer.append(_detached(k), _detached(v), layout.positions, layout.valid, new_tokens=h.shape[1],
                       all_kept=layout.all_valid)


def resolve_backend(backend: str, compacted: bool, q: torch.Tensor, window: Optional[int] = None,
                    has_cache: bool = False, static_queries: bool = True) -> str:
    """The back end of this call: attention.choose_backend (every rule lives there) on q's device and dtype.
    (flash-attn is looked up only for CUDA tensors: no per-layer package lookup on the CPU path.)"""
    return choose_backend(backend, q.device.type, q.dtype, compacted, window, has_cache, static_queries,
                          q.is_cuda and flash_attn_available(), flex_attention_available())


def run_attention(backend, q, k, v, q_pos, k_pos, k_valid, r: LayerRouting, compacted: bool, q_real,
                  open_keys: bool = False, prefix_keys: bool = False):
    """backend: resolved (resolve_backend). open_keys: every query may attend every key (no mask needed).
    prefix_keys: the keys are positions 0..K-1, all valid (then k_pos and k_valid say nothing more)."""
    if backend == "flash" and compacted:  # (choose_backend picks flash only for compacted, unwindowed calls)
        return flash_varlen_attention(q, k, v, q_real, k_valid, r.scale)
    if backend == "flex":  # block masks shared through the per-forward dict (position_block_mask)
        return flex_attention_call(q, k, v, q_pos, k_pos, k_valid, r.window, r.scale, r.ctx.layouts)
    if prefix_keys:
        return sdpa_prefix_attention(q, k, v, q_pos, r.window, r.scale)
    if open_keys:
        return sdpa_unmasked(q, k, v, r.scale)
    return sdpa_attention(q, k, v, q_pos, k_pos, k_valid, r.window, r.scale)


def mlp_sublayer(layer, r: LayerRouting, h, plan: Plan, h_is_scratch: bool) -> torch.Tensor:
    """h_is_scratch: h is this block's own post-attention tensor, used by nothing after the MLP, so without
    autograd the MLP output can be added into it in place."""
    ad = r.adapter
    mlp, norm = getattr(layer, ad.mlp), getattr(layer, ad.mlp_norm)
    if plan.empty:
        return h
    x = h if plan.idx is None else gather_tokens(h, plan.idx)
    return combine(h, mlp(norm(x)), plan, r.ctx.cfg.gate_grad == "dense", h_is_scratch=h_is_scratch)


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
            buffer.index_add_(0, _row_or_spare(plan.idx, used, seq_len), rows)
        else:
            rows = torch.where(used.reshape(-1, 1), rows, torch.zeros((), dtype=out.dtype, device=out.device))
            h.view(batch * seq_len, dim).index_add_(0, _flat_index(plan.idx, seq_len), rows)
        return h
    return scatter_add_tokens(h, plan.idx, out, used)


def spare_row_buffer(h: torch.Tensor) -> Optional[torch.Tensor]:
    """The (B*S + 1, d) buffer whose first B*S rows are h, when h came from scatter_add_tokens (its last row is
    scratch), else None. Only asked for a tensor this block made itself (h_is_scratch)."""
    base = h._base
    batch, seq_len, dim = h.shape
    if base is None or base.shape != (batch * seq_len + 1, dim) or base.data_ptr() != h.data_ptr() \
            or not base.is_contiguous():
        return None
    return base


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
