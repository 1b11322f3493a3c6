"""Which attention back end serves one routed attention call: each back end declares what it computes exactly
(BACKENDS), and choose_backend holds every rule that picks one. Pure logic: no tensors, no device queries."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BackendSupport:
    """What one attention back end can serve exactly (declared once; choose_backend reads only these)."""

    devices: Optional[tuple[str, ...]] = None  # None: any device
    half_only: bool = False  # fp16/bf16 inputs only
    compacted_only: bool = False  # exact only where the keys are the query slots plus an earlier cache
    windows: bool = True  # exact with a sliding window
    softcap: bool = False  # applies attention logit soft-capping (Gemma 2); a back end without it must not serve
    # auto picks it only on CUDA in fp16/bf16 (on CPU and in fp32 the SDPA paths are the measured fast ones) ...
    auto_gpu_half: bool = False
    # ... and only with a static query count and no KV cache (compiled once with dynamic=False)
    auto_static_only: bool = False


BACKENDS: dict[str, BackendSupport] = {
    # flash-attn varlen: causal bottom-right alignment is "by position" only for compacted slots, and its window
    # counts packed key slots, not positions
    "flash": BackendSupport(devices=("cuda",), half_only=True, compacted_only=True, windows=False,
                            auto_gpu_half=True),
    "flex": BackendSupport(softcap=True, auto_gpu_half=True, auto_static_only=True),
    # SDPA with an explicit mask (and the CPU blocked key-trimming path); it has no soft-capping
    "sdpa": BackendSupport(),
    # the same mask and blocked paths with an explicit score computation that soft-caps (exact, slower)
    "math": BackendSupport(softcap=True),
}
AUTO_ORDER = ("flash", "flex", "sdpa", "math")


@dataclass(frozen=True)
class CallFacts:
    """The facts of one attention call that decide which back ends can serve it."""

    device_type: str
    half: bool
    compacted: bool
    window: Optional[int]
    softcap: Optional[float]
    has_cache: bool
    static_queries: bool


def serves(name: str, call: CallFacts) -> bool:
    """Back end `name` computes this call exactly (availability aside)."""
    s = BACKENDS[name]
    return ((s.devices is None or call.device_type in s.devices) and (call.half or not s.half_only)
            and (call.compacted or not s.compacted_only) and (call.window is None or s.windows)
            and (call.softcap is None or s.softcap))


def _auto_picks(name: str, call: CallFacts) -> bool:
    s = BACKENDS[name]
    return serves(name, call) and (not s.auto_gpu_half or (call.device_type == "cuda" and call.half)) and (
        not s.auto_static_only or (call.static_queries and not call.has_cache))


def choose_backend(requested: str, device_type: str, dtype: torch.dtype, compacted: bool, window: Optional[int],
                   has_cache: bool, static_queries: bool, flash_available: bool, flex_available: bool,
                   softcap: Optional[float] = None) -> str:
    """The attention back end of one routed attention call: "sdpa", "math", "flash" or "flex". Pure logic over
    BACKENDS' declarations.

    requested: routers.attn_backend ("auto", "sdpa", "flash", "flex"). compacted: the keys are this call's query
    slots plus an earlier cache (kv_policy=routed with slots). has_cache: a KV cache is in use (prefill/decode).
    static_queries: the query count is a static one (S, or the k = ceil(capacity * S) slots), not a data-dependent
    count (inference_slots=dynamic): a kernel compiled with dynamic=False then compiles once per batch shape.
    softcap: the layer's attention logit soft-capping (Gemma 2), or None.

    - flash is exact only for compacted slots without a sliding window or soft-capping, on CUDA in fp16/bf16.
    - auto: the first of AUTO_ORDER that serves the call and that auto picks there: flash where available;
      flex on CUDA in fp16/bf16 with no cache and a static query count (kv_policy=all always lands here); else
      sdpa, or math where sdpa cannot serve (soft-capping). On CPU and in fp32 that is sdpa (or math).
    - flash requested for a call it cannot serve exactly or at all: the auto choice without flash; a warning
      (once per reason) when the reason is the config (fp32, a sliding window, soft-capping, no flash-attn here),
      none for calls that simply are not compacted (mask mode, a sublayer every token executes), as before.
    - sdpa and flex requested: used as asked (flex falls back to sdpa where torch lacks it), except that a
      soft-capped call never goes to a back end that ignores the cap (math serves it instead of sdpa).
    """
    call = CallFacts(device_type, dtype in HALF_DTYPES, compacted, window, softcap, has_cache, static_queries)
    available = {"flash": flash_available, "flex": flex_available, "sdpa": True, "math": True}
    if requested == "sdpa":
        return _sdpa_or_math(call)
    if requested == "flex":
        return "flex" if flex_available else _sdpa_or_math(call)
    if available["flash"] and _auto_picks("flash", call):
        return "flash"
    if requested == "flash":
        reason = _flash_refusal(call, flash_available)
        if reason is not None:
            _warn_once(f"routers.attn_backend=flash: {reason}; using the exact back end auto picks instead")
    return next(name for name in AUTO_ORDER[1:] if available[name] and _auto_picks(name, call))


def _sdpa_or_math(call: CallFacts) -> str:
    return "sdpa" if serves("sdpa", call) else "math"


def _flash_refusal(call: CallFacts, flash_available: bool):
    if not (call.device_type == "cuda" and flash_available):
        return "flash-attn cannot run here (it needs a CUDA device and the flash-attn package)"
    if not call.half:
        return "flash-attn takes fp16/bf16 inputs only, these are fp32"
    if call.compacted and call.window is not None:
        return ("a sliding window over compacted keys (kv_policy=routed) is not exact in flash-attn, whose "
                "window counts key slots, not positions")
    if call.compacted and call.softcap is not None:
        return "this model soft-caps attention logits, which the flash-attn path does not apply"
    return None  # not compacted: flash never served these calls


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
