"""One attention spec per routed attention call: what the call's keys are and which back end serves it, decided
once, then one dispatch.

Key layouts (what the keys of the call are, relative to its queries):
- `prefix`: positions 0..K-1 of the sequence, all valid (kv_policy=all, no padding, nothing cached before this
  chunk): SDPA then needs no (Q, K) mask reduction, only each block's causal range.
- `cached`: one new token per row over a cache of only valid entries, all inside the window: every key is allowed
  (the decode case), no mask at all.
- `compacted`: the query slots themselves plus an earlier cache (kv_policy=routed with slots): causal by slot order,
  which is what flash-attn's bottom-right alignment computes.
- `general`: anything else: a mask from query and key positions and key flags.
The back end is backend_choice.choose_backend's answer for the call's facts; the layout only picks the cheapest
exact form of that back end. Building a spec costs no tensor op and no host read.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .attention import (choose_backend, flash_attn_available, flash_varlen_attention, flex_attention_available,
                        flex_attention_call, sdpa_attention, sdpa_prefix_attention, sdpa_unmasked)

PREFIX, CACHED, COMPACTED, GENERAL = "prefix", "cached", "compacted", "general"


@dataclass(frozen=True)
class AttentionSpec:
    backend: str  # "sdpa", "math", "flex" or "flash" (backend_choice.BACKENDS)
    keys: str  # key layout: PREFIX, CACHED, COMPACTED or GENERAL
    window: Optional[int]  # sliding window in positions, None for full attention
    scale: float
    softcap: Optional[float]  # attention logit soft-capping (Gemma 2), None without


def attention_spec(requested: str, q: torch.Tensor, window: Optional[int], scale: float, softcap: Optional[float],
                   *, compacted: bool, has_cache: bool, static_queries: bool, prefix: bool,
                   open_keys: bool) -> AttentionSpec:
    """The spec of one call. requested: routers.attn_backend. compacted: kv_policy=routed with slots. prefix: the
    keys are positions 0..K-1, all valid. open_keys: every query may attend every key (KeySet.open_keys).
    static_queries: the query count is static (S or the k slots), not a data-dependent dynamic-slot count.
    (flash-attn is looked up only for CUDA tensors: no per-layer package lookup on the CPU path.)"""
    return _spec(requested, q.device.type, q.dtype, window, scale, softcap, compacted, has_cache, static_queries,
                 prefix, open_keys, q.is_cuda and flash_attn_available(), flex_attention_available())


@functools.lru_cache(maxsize=4096)
def _spec(requested, device_type, dtype, window, scale, softcap, compacted, has_cache, static_queries, prefix,
          open_keys, flash_ok, flex_ok) -> AttentionSpec:
    # A pure function of a few distinct values per layer: cached, so a call costs one lookup, not the chooser's
    # work and a dataclass build (at batch-1 decode that is per layer and token).
    backend = choose_backend(requested, device_type, dtype, compacted, window, has_cache, static_queries, flash_ok,
                             flex_ok, softcap)
    keys = PREFIX if prefix else CACHED if open_keys else COMPACTED if compacted else GENERAL
    return AttentionSpec(backend, keys, window, scale, softcap)


class KeySet(NamedTuple):
    """The keys and values a call attends (cached ones first), with their positions (B, K) and flags (B, K).
    From a cache, positions and flags are fetched only when a back end reads them (a contiguous cache builds them
    on demand). (A NamedTuple: built per call, it must cost next to nothing.)"""

    keys: torch.Tensor
    values: torch.Tensor
    pos: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    cache: Optional[object] = None  # the RoutedCacheLayer holding them, positions and flags not yet fetched
    open_keys: bool = False  # one new token per row over only valid entries, all inside the window

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            return self.cache.key_pos, self.cache.key_valid
        return self.pos, self.valid


def run_attention(spec: AttentionSpec, q, keys: KeySet, q_pos, q_real, layouts: Optional[dict] = None):
    """q (B, H, Q, D) at positions q_pos (B, Q); q_real (B, Q): the slot holds a token (flash packs only those:
    under kv_policy=routed its probes get no output, so no gradient signal). layouts: the per-forward dict flex
    shares block masks through. Returns (B, H, Q, D)."""
    k, v = keys.keys, keys.values
    if spec.backend == "flash":  # (choose_backend picks flash only for compacted, unwindowed, uncapped calls)
        return flash_varlen_attention(q, k, v, q_real, keys.positions()[1], spec.scale)
    if spec.backend == "flex":
        k_pos, k_valid = keys.positions()
        return flex_attention_call(q, k, v, q_pos, k_pos, k_valid, spec.window, spec.scale, layouts,
                                   softcap=spec.softcap)
    # sdpa, or math (the same paths with an explicit, soft-capping score computation)
    if spec.keys == PREFIX:
        return sdpa_prefix_attention(q, k, v, q_pos, spec.window, spec.scale, softcap=spec.softcap)
    if spec.keys == CACHED:
        return sdpa_unmasked(q, k, v, spec.scale, softcap=spec.softcap)
    k_pos, k_valid = keys.positions()
    return sdpa_attention(q, k, v, q_pos, k_pos, k_valid, spec.window, spec.scale, softcap=spec.softcap)


def keys_with_cache(cache_layer, k, v, k_pos, keep, new_tokens: int, all_kept: bool,
                    window: Optional[int]) -> KeySet:
    """This chunk's keys/values after the cached ones (appended to cache_layer first), or the chunk's alone
    without a cache. keep (B, L): which of the chunk's entries later queries may attend."""
    if cache_layer is None:
        return KeySet(k, v, k_pos, keep)
    past = cache_layer.past() if k.requires_grad else None
    cache_layer.append(detached(k), detached(v), k_pos, keep, new_tokens=new_tokens, all_kept=all_kept)
    open_keys = new_tokens == 1 and cache_layer.all_valid and (window is None or cache_layer.seen <= window)
    if past is not None:  # autograd records this chunk's keys: attend them, not the cache's detached copy
        return KeySet(torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2),
                      torch.cat([past[2], k_pos], dim=1), torch.cat([past[3], keep], dim=1), open_keys=open_keys)
    if k.requires_grad or cache_layer.keys.shape[2] == 0:
        # (an empty cache: no row kept a key yet, e.g. mask mode; the chunk's rows are then opened by allowed_mask)
        return KeySet(k, v, k_pos, keep, open_keys=open_keys)
    # The cache (appended first) already holds the past and this chunk, minus entries never attended: no copy.
    return KeySet(cache_layer.keys, cache_layer.values, cache=cache_layer, open_keys=open_keys)


def detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad else t  # (no alias op when there is nothing to detach)
