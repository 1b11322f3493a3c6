"""Attention over arbitrary (gathered) queries and keys, with causality by ORIGINAL position.

Every routed attention call reduces to: queries at positions q_pos attend keys at positions k_pos that are
valid, not in the future, and (with a sliding window) not too far back. Back ends:
- `sdpa`: PyTorch scaled_dot_product_attention with that boolean mask (CPU and GPU; exact for every case).
- `flash`: flash-attn varlen, GPU only, fp16/bf16 only, only for compacted (kv_policy=routed) sequences whose
  keys are the queries themselves plus an earlier cache, and only without a sliding window: there causal
  bottom-right alignment is exactly "by position", but flash's window counts compacted KEY SLOTS, not positions.
  (flash-attn's own causal mask is WRONG for arbitrary gathered queries, hence kv_policy=all never uses it.)
- `flex`: FlexAttention whose mask_mod reads the position vectors (q_pos, k_pos, k_valid, window), so its block
  mask skips future blocks; compiled once on GPU, eager on CPU (slow but exact, for tests). Soft-caps through a
  score_mod.
- `math`: the SDPA paths (mask, CPU blocked key trimming) with an explicit score computation, for soft-capped
  attention logits (Gemma 2), which SDPA cannot apply.
Each back end declares what it serves (backend_choice.BACKENDS); choose_backend there holds every rule that picks
one of them; attention_spec decides it once per call.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ..errors import SkipGPTError
from .backend_choice import HALF_DTYPES, choose_backend  # noqa: F401 (the chooser's home; imported from here too)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def flex_attention_available() -> bool:
    return True  # torch>=2.6 (setup.py) always ships torch.nn.attention.flex_attention


def check_backend(backend: str) -> None:
    """Fail at attach time, not mid-training, when a requested back end cannot run here."""
    if backend == "flash" and not flash_attn_available():
        raise SkipGPTError("routers.attn_backend=flash needs a CUDA GPU and the flash-attn package: "
                           "pip install -e '.[gpu]' on a GPU node, or use attn_backend=auto")
    if backend == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as err:
            raise SkipGPTError("routers.attn_backend=flex needs torch>=2.5 (torch.nn.attention.flex_attention): "
                               "upgrade torch or use attn_backend=auto") from err


def allowed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor,
                 window: Optional[int]) -> torch.Tensor:
    """(B, 1, Q, K) bool: key is valid, not after the query, and inside the sliding window (if any).

    A query row with no allowed key (a padding query, or a skipped token under kv_policy=routed in mask mode)
    is opened to every key so softmax stays finite; such rows are always discarded by the caller and their zero
    output gradient keeps them from influencing anything.
    """
    allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    # max over the bytes of the bool mask: same answer as any(), which is ~20x slower along the last dim on CPU
    empty = allowed.view(torch.uint8).amax(dim=-1, keepdim=True) == 0
    # On CPU skip the (slow, broadcast) in-place OR when no row is empty, the usual case; elsewhere stay sync-free.
    if allowed.device.type != "cpu" or torch.compiler.is_compiling() or bool(empty.any()):
        allowed = allowed | empty
    return allowed[:, None]


# Query rows per SDPA call on the CPU key-trimming path (see sdpa_attention). Measured at S=1024 with 615 and 768
# gathered queries (40% / 25% skip), 1 and 2 threads: 64 rows is 5-8% faster than 128 (smaller blocks trim their key
# range closer to their causal prefix; below 64 the per-call cost and PyTorch's 32-row kernel tiles win back).
SDPA_QUERY_BLOCK = 64


def sdpa_attention(q, k, v, q_pos, k_pos, k_valid, window, scale, softcap=None):
    """q (B, H, Q, D); k, v (B, Hkv, K, D). Returns (B, H, Q, D).

    With an explicit mask SDPA computes every (query, key) pair; is_causal's skipping of the future does not
    apply to gathered queries. On CPU the queries are therefore split into blocks of SDPA_QUERY_BLOCK rows and
    each block attends only the key range [lo, hi) that holds all of its allowed keys (queries come sorted by
    position, so a block's range is about its causal prefix): the same allowed set per row, about half the work.
    """
    mask = allowed_mask(q_pos, k_pos, k_valid, window)
    if not _trim_keys(q):
        return _sdpa_one_call(q, k, v, mask, scale, softcap)
    return _sdpa_in_blocks(q, k, v, _key_spans(mask, SDPA_QUERY_BLOCK),
                           lambda s, e, lo, hi: mask[:, :, s:e, lo:hi], scale, softcap)


def sdpa_prefix_attention(q, k, v, q_pos, window, scale, softcap=None):
    """Attention where the keys are positions 0..K-1 of the sequence, all valid (kv_policy=all with no padding and
    nothing cached before): a query at position p attends keys [max(0, p - window + 1), p]. The same as
    sdpa_attention without building and reducing a (Q, K) mask: each block's key range comes from its first and
    last query positions (queries are sorted by position within each row), and each block's mask is made for its
    range only.
    """
    rows = q.shape[2]
    if not _trim_keys(q):  # one call over every key (no host sync; GPU, torch.compile, short sequences)
        keys = k.shape[2]
        return _sdpa_one_call(q, k, v, _PrefixMaskRows(keys, window, q.dtype, q.device)(q_pos, 0, keys), scale,
                              softcap)
    starts = list(range(0, rows, SDPA_QUERY_BLOCK))
    ends = [min(s + SDPA_QUERY_BLOCK, rows) for s in starts]
    # one host read for every block's range: the last query of a block has the block's highest position
    his = (q_pos[:, [e - 1 for e in ends]].amax(dim=0) + 1).tolist()
    los = [0] * len(starts) if window is None else \
        (q_pos[:, starts].amin(dim=0) - window + 1).clamp_min(0).tolist()
    mask_rows = _PrefixMaskRows(max(his), window, q.dtype, q.device)
    return _sdpa_in_blocks(q, k, v, list(zip(starts, ends, los, his)),
                           lambda s, e, lo, hi: mask_rows(q_pos[:, s:e], lo, hi), scale, softcap)


def _sdpa_one_call(q, k, v, mask, scale, softcap=None):
    k, v, native_gqa = _grouped_kv(q, k, v, mask)
    return _kernel(softcap)(q, k, v, attn_mask=mask, scale=scale, enable_gqa=native_gqa)


def _kernel(softcap: Optional[float]):
    """SDPA, or with soft-capping the explicit computation (SDPA has no cap): the same call signature."""
    return F.scaled_dot_product_attention if softcap is None else functools.partial(softcapped_attention,
                                                                                      softcap=softcap)


def softcapped_attention(q, k, v, attn_mask=None, scale=None, enable_gqa=False, softcap=None):
    """softmax(softcap * tanh(q k^T * scale / softcap) + mask) v, as Gemma 2's eager attention computes it (the
    cap before the mask, softmax in fp32). attn_mask: bool (True = allowed) or additive float, (B, 1, Q, K)."""
    if enable_gqa and k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else \
            scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _sdpa_in_blocks(q, k, v, spans, block_mask, scale, softcap=None):
    """One SDPA call per (start, end, lo, hi) span: query rows [start, end) over keys [lo, hi), with
    block_mask(start, end, lo, hi). CPU only (its SDPA reads grouped KV heads natively: no repeated K/V)."""
    gqa, kernel = k.shape[1] != q.shape[1], _kernel(softcap)
    outs = [kernel(q[:, :, s:e], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=block_mask(s, e, lo, hi), scale=scale,
                   enable_gqa=gqa).transpose(1, 2)
            for s, e, lo, hi in spans]
    # Joined in (B, Q, H, D) memory, as CPU SDPA lays out its own output: the caller's
    # transpose(1, 2).reshape(B, Q, H * D) is then a view, not one more copy of every row.
    return torch.cat(outs, dim=1).transpose(1, 2)


class _PrefixMaskRows:
    """Additive float masks for prefix attention: rows(q_pos, lo, hi) is (B, 1, Q, hi - lo), 0 where key j in
    [lo, hi) is allowed for the query at position p (j <= p, inside the window) and -inf elsewhere.

    Whether j is allowed depends only on j - p, so every row is a slice of one step vector indexed by j - p, and
    a block's mask is one gather. A bool mask costs a compare here and SDPA's own bool -> float conversion
    (two more passes) on every block.
    """

    def __init__(self, keys: int, window: Optional[int], dtype: torch.dtype, device):
        offset = torch.arange(2 * keys, device=device) - (keys - 1)  # element i stands for j - p = i - (keys - 1)
        allowed = offset <= 0
        if window is not None:
            allowed &= offset > -window
        self.keys = keys
        self.step = torch.zeros(2 * keys, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

    def __call__(self, q_pos: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        # row p starts at j - p = lo - p: element keys - 1 + lo - p, in [0, keys - 1] as lo <= p < hi <= keys
        windows = self.step.unfold(0, hi - lo, 1)
        return windows[(self.keys - 1 + lo) - q_pos][:, None]


def sdpa_unmasked(q, k, v, scale, softcap=None):
    """Attention where every query may attend every key (e.g. one decode token over an all-valid cache)."""
    k, v, native_gqa = _grouped_kv(q, k, v)
    return _kernel(softcap)(q, k, v, scale=scale, enable_gqa=native_gqa)


def _grouped_kv(q, k, v, mask=None):
    """(k, v, enable_gqa): CPU SDPA reads grouped KV heads natively. On CUDA so does every fused kernel that
    accepts this call with enable_gqa=True (flash without a mask; memory-efficient with a mask where this torch's
    build supports GQA; cuDNN): asked of torch itself, per call. Otherwise K/V are repeated per query head, as
    enable_gqa would fall back to the math kernel (the whole (Q, K) score matrix in memory)."""
    if k.shape[1] == q.shape[1] or q.device.type == "cpu":
        return k, v, k.shape[1] != q.shape[1]
    if q.device.type == "cuda" and _fused_gqa_ok(q, k, v, mask):
        return k, v, True
    repeat = q.shape[1] // k.shape[1]
    return k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1), False


def _fused_gqa_ok(q, k, v, mask) -> bool:
    """Would a fused CUDA SDPA kernel take this call with grouped KV heads (enable_gqa=True)? Host-side checks
    only (shapes, dtypes, the GPU's capabilities, enabled kernels): no sync. Not asked under torch.compile."""
    if torch.compiler.is_compiling():
        return False
    from torch.backends.cuda import (SDPAParams, can_use_cudnn_attention, can_use_efficient_attention,
                                     can_use_flash_attention)

    params = SDPAParams(q, k, v, mask, 0.0, False, True)
    return (can_use_flash_attention(params) or can_use_efficient_attention(params)
            or can_use_cudnn_attention(params))


def _trim_keys(q: torch.Tensor) -> bool:
    # Data-dependent key ranges: CPU eager only (on GPU they would cost a host sync per layer, and under
    # torch.compile data-dependent shapes would recompile).
    return q.device.type == "cpu" and q.shape[2] > SDPA_QUERY_BLOCK and not torch.compiler.is_compiling()


def _key_spans(mask: torch.Tensor, block: int) -> list[tuple[int, int, int, int]]:
    """(start, end, lo, hi) per block of query rows: keys outside [lo, hi) are masked for every row of the block
    (in every batch row). Every row has at least one allowed key (allowed_mask opens empty rows to all keys),
    so each range is non-empty, and an opened row keeps its whole key range."""
    batch, _, rows, keys = mask.shape
    starts = list(range(0, rows, block))
    # (blocks, K): does any row of the block (in any batch row) allow this key? max over the mask's bytes
    # (bool any() along these dims is much slower on CPU); whole blocks in one reduction, then the remainder.
    flat = mask[:, 0].view(torch.uint8)
    full = rows // block * block
    cols = flat[:, :full].reshape(batch, full // block, block, keys).amax(dim=2).amax(dim=0)
    if full < rows:
        cols = torch.cat([cols, flat[:, full:].amax(dim=1).amax(dim=0, keepdim=True)])
    cols = cols > 0
    arange = torch.arange(keys, device=mask.device)
    lo = torch.where(cols, arange, keys).amin(dim=1).tolist()
    hi = (torch.where(cols, arange, -1).amax(dim=1) + 1).tolist()
    return [(s, min(s + block, rows), a, b) for s, a, b in zip(starts, lo, hi)]


_COMPILED_FLEX = None


def _flex_kernel(device_type: str):
    """flex_attention compiled once per process (dynamic=False) for GPUs; eager on CPU (an unfused reference
    implementation there: slow but exact, which is all the CPU tests need)."""
    global _COMPILED_FLEX
    if device_type == "cpu":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def position_mask_mod(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor, window: Optional[int]):
    """FlexAttention mask_mod of allowed_mask from the position vectors only: q_pos (B, Q), k_pos (B, K),
    k_valid (B, K) bool, window an int or None. No (B, Q, K) tensor exists; block sparsity follows from the
    positions (a query block skips every key block that lies after it, or before its window)."""

    def mask_mod(b, h, q_idx, kv_idx):
        qp, kp = q_pos[b, q_idx], k_pos[b, kv_idx]
        allowed = k_valid[b, kv_idx] & (kp <= qp)
        if window is not None:
            allowed = allowed & (qp - kp < window)
        return allowed

    return mask_mod


def position_block_mask(q_pos, k_pos, k_valid, window, cache: Optional[dict] = None):
    """The BlockMask of position_mask_mod, built once per forward for each distinct (q_pos, k_pos, k_valid,
    window): `cache` is the routing context's per-forward dict (cleared when the next forward starts). Layers
    whose queries and keys are the same tensors share one mask (kv_policy=all with dense plans: mask mode, routing
    off); layers with their own query slots build their own (their block sparsity depends on their positions).
    Entries hold the tensors they were built from and hit only on those very objects (ids are reused once freed).
    """
    key = ("flex_block_mask", id(q_pos), id(k_pos), id(k_valid), window)
    hit = None if cache is None else cache.get(key)
    if hit is not None and hit[0] is q_pos and hit[1] is k_pos and hit[2] is k_valid:
        return hit[3]
    batch, rows = q_pos.shape
    device = q_pos.device
    # On GPU the mask creation is compiled too (eager create_block_mask evaluates mask_mod over all (B, Q, K)).
    block_mask = create_block_mask(position_mask_mod(q_pos, k_pos, k_valid, window), batch, None, rows,
                                   k_pos.shape[1], device=device, _compile=device.type == "cuda")
    if cache is not None:
        cache[key] = (q_pos, k_pos, k_valid, block_mask)
    return block_mask


def flex_attention_call(q, k, v, q_pos, k_pos, k_valid, window, scale, cache: Optional[dict] = None,
                        softcap: Optional[float] = None):
    """q (B, H, Q, D); k, v (B, Hkv, K, D), grouped KV heads read natively. A query with no allowed key (padding,
    discarded by the caller) gets a zero output. softcap: a score_mod caps the (scaled) logits before the mask."""
    block_mask = position_block_mask(q_pos, k_pos, k_valid, window, cache)
    return _flex_kernel(q.device.type)(q, k, v, block_mask=block_mask, scale=scale,
                                       score_mod=None if softcap is None else _softcap_score_mod(softcap),
                                       enable_gqa=k.shape[1] != q.shape[1])


def _softcap_score_mod(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


def flash_varlen_attention(q, k, v, q_real, k_real, scale):
    """Compacted causal attention: q (B, H, Q, D) slots in token order; k/v (B, Hkv, K, D) cache then the same
    slots. Only real entries (q_real, k_real) are packed.

    Rows are packed with cu_seqlens; causal=True aligns bottom-right, which is exact here because each row's
    real queries are its last real keys, in the same order. No sliding window: flash-attn's window_size counts
    packed KEY SLOTS, and compacted keys skip positions, so (window - 1, 0) would admit keys from too far back
    (choose_backend never sends a windowed layer here).
    """
    from flash_attn import flash_attn_varlen_func

    def pack(x, real):
        x = x.transpose(1, 2)  # (B, L, H, D)
        lens = real.sum(dim=1, dtype=torch.int32)
        cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        # max_seqlen only sizes flash's grid: the static row length bounds it without reading lens on the host
        # (the boolean packing x[real] still does one sync per call; see the README's Known limits)
        return x[real], cu, x.shape[1]

    q_packed, cu_q, max_q = pack(q, q_real)
    k_packed, cu_k, max_k = pack(k, k_real)
    v_packed, _, _ = pack(v, k_real)
    out = flash_attn_varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                 causal=True)
    full = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    full[q_real] = out
    return full.transpose(1, 2)
