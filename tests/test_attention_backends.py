"""Attention back ends inside routed blocks (issue #15 items 4 and 5), on CPU.

- choose_backend: every rule, over every combination of its inputs (GPU choices are pure logic, testable here).
- flash-attn varlen: replaced by varlen_reference, a PyTorch implementation of flash_attn_varlen_func's documented
  contract, so the flash code path runs on CPU. A sliding window over compacted keys (kv_policy=routed) must never
  reach it: flash's window counts key slots, not positions.
- FlexAttention (eager on CPU) == SDPA == the mask-mode reference; its block mask is built from position vectors
  only, once per forward for layers that share queries and keys.
"""
import functools
import importlib.machinery
import itertools
import sys
import types

import pytest
import torch

import skipgpt_dist.routing.attention as attention
import skipgpt_dist.routing.attention_spec as spec_mod
import skipgpt_dist.routing.backend_choice as backend_choice
from routing_models import FAMILIES, batch, build
from skipgpt_dist import RouterConfig, attach_routers, routing_context, routing_disabled
from skipgpt_dist.routing.attention import (choose_backend, flash_varlen_attention,
                                            flex_attention_call, position_mask_mod, sdpa_attention)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- the chooser

def all_choices():
    for combo in itertools.product(("auto", "sdpa", "flash", "flex"), ("cpu", "cuda"), DTYPES, (False, True),
                                   (None, 7), (False, True), (False, True), (False, True), (False, True)):
        requested, device, dtype, compacted, window, cache, static, flash_ok, flex_ok = combo
        with _no_raise():
            got = choose_backend(requested, device, dtype, compacted, window, cache, static, flash_ok, flex_ok)
        yield dict(requested=requested, device=device, dtype=dtype, compacted=compacted, window=window,
                   cache=cache, static=static, flash_ok=flash_ok, flex_ok=flex_ok), got


class _no_raise:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def expected_backend(c) -> str:
    """The rules, written out as a table (independently of choose_backend's code)."""
    half = c["dtype"] != torch.float32
    flash_exact = c["compacted"] and c["window"] is None
    if c["requested"] == "sdpa":
        return "sdpa"
    if c["requested"] == "flex":
        return "flex" if c["flex_ok"] else "sdpa"
    # auto, or flash (which falls back to what auto picks without flash)
    if c["device"] == "cuda" and half and c["flash_ok"] and flash_exact:
        return "flash"
    if c["device"] == "cuda" and half and c["flex_ok"] and c["static"] and not c["cache"]:
        return "flex"
    return "sdpa"


def test_choose_backend_every_combination():
    cases = list(all_choices())
    assert len(cases) == 4 * 2 * 3 * 2 ** 6
    for c, got in cases:
        assert got == expected_backend(c), c
        # the invariants the table implies, stated on their own
        if got == "flash":
            assert c["device"] == "cuda" and c["dtype"] != torch.float32 and c["flash_ok"]
            assert c["compacted"] and c["window"] is None
        if c["device"] == "cpu" and c["requested"] == "auto":
            assert got == "sdpa"  # the CPU paths are unchanged
        if c["dtype"] == torch.float32 and c["requested"] == "auto":
            assert got == "sdpa"


def test_fp32_never_resolves_to_flash():
    for requested, compacted, window in itertools.product(("auto", "flash"), (False, True), (None, 4)):
        with _no_raise():
            assert choose_backend(requested, "cuda", torch.float32, compacted, window, False, True, True,
                                  True) != "flash"
    q32 = torch.zeros(1, 2, 3, 4)
    spec = spec_mod.attention_spec("auto", q32, None, 1.0, None, compacted=True, has_cache=False, static_queries=True,
                                   prefix=False, open_keys=False)
    assert spec.backend == "sdpa"


def test_explicit_flash_that_cannot_serve_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(backend_choice, "_WARNED", set())
    with pytest.warns(UserWarning, match="fp16/bf16 inputs only"):
        assert choose_backend("flash", "cuda", torch.float32, True, None, False, True, True, True) == "sdpa"
    with pytest.warns(UserWarning, match="sliding window over compacted keys"):
        assert choose_backend("flash", "cuda", torch.bfloat16, True, 7, False, True, True, True) == "flex"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each reason once; and a non-compacted call is no misconfiguration
        assert choose_backend("flash", "cuda", torch.float32, True, None, False, True, True, True) == "sdpa"
        assert choose_backend("flash", "cuda", torch.bfloat16, False, None, True, True, True, True) == "sdpa"
        assert choose_backend("flash", "cuda", torch.bfloat16, True, None, False, True, True, True) == "flash"


# ---------------------------------------------------------------- flash-attn varlen, emulated on CPU

def varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """flash_attn_varlen_func's documented semantics in PyTorch. q (total_q, H, D); k, v (total_k, Hk, D), H a
    multiple of Hk (MQA/GQA); sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]. Query row r of a sequence with
    sq queries and sk keys may attend key j iff, with d = sk - sq (bottom-right alignment):
      causal: j <= r + d;  window_size = (left, right), -1 meaning unbounded: r + d - left <= j <= r + d + right
    (causal=True means right = 0). A row with no allowed key outputs 0. Computed in fp32."""
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window_size
    if causal:
        right = 0
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i],
                                            cu_seqlens_k[i + 1]))
        sq, sk = qe - qs, ke - ks
        r = torch.arange(sq)[:, None] + (sk - sq)
        j = torch.arange(sk)[None, :]
        allowed = torch.ones(sq, sk, dtype=torch.bool)
        if right >= 0:
            allowed &= j <= r + right
        if left >= 0:
            allowed &= j >= r - left
        qq = q[qs:qe].float().transpose(0, 1)  # (H, sq, D)
        kk = k[ks:ke].float().transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
        vv = v[ks:ke].float().transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
        scores = (qq @ kk.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[qs:qe] = (probs @ vv).transpose(0, 1)
    return out.to(q.dtype)


@pytest.fixture
def fake_flash(monkeypatch):
    """flash_attn in sys.modules with varlen_reference as flash_attn_varlen_func; counts its calls."""
    calls = []

    def func(*args, **kwargs):
        calls.append(kwargs.get("window_size", (-1, -1)))
        return varlen_reference(*args, **kwargs)

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


def pretend_cuda_with_flash(monkeypatch):
    """The chooser's GPU choices on CPU tensors: the real choose_backend, told the device is CUDA with flash-attn
    installed. (Tensors stay on CPU, so flex runs eagerly and SDPA takes its CPU path.)"""
    real = choose_backend

    def on_cuda(requested, device_type, dtype, compacted, window, has_cache, static_queries, flash_ok, flex_ok,
                softcap=None):
        return real(requested, "cuda", dtype, compacted, window, has_cache, static_queries, True, flex_ok, softcap)

    monkeypatch.setattr(spec_mod, "choose_backend", on_cuda)
    # specs are cached per call facts: a fresh cache while pretending (none of the real device's choices)
    monkeypatch.setattr(spec_mod, "_spec", functools.lru_cache(maxsize=None)(spec_mod._spec.__wrapped__))


def test_varlen_reference_is_flash_contract_for_compacted_keys(fake_flash):
    """Without a window the flash path (through the reference) is exact for compacted keys: == sdpa_attention."""
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, slots, d = 3, 6, 2, 9, 8
    q, k, v = (torch.randn(b, n, slots, d, generator=gen) for n in (h, hkv, hkv))
    real = torch.rand(b, slots, generator=gen) < 0.7
    real[:, 0] = True
    pos = torch.sort(torch.randperm(40, generator=gen)[:slots]).values.expand(b, slots)
    got = flash_varlen_attention(q, k, v, real, real, 0.3)
    want = sdpa_attention(q, k, v, pos, pos, real, None, 0.3)
    mask = real[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert len(fake_flash) == 1


def forced_flash_logits(family, dtype, monkeypatch, ids, mask, **kw):
    model = build(family, mode="capacity", kv_policy="routed", skip_shift=0.5, **kw).to(dtype)
    routing_context(model).cfg.attn_backend = "flash"  # (attach_routers refuses flash without a GPU)
    pretend_cuda_with_flash(monkeypatch)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[mask.bool()].float()


@pytest.mark.parametrize("padding", ["none", "left"])
def test_windowed_compacted_attention_never_reaches_flash(padding, fake_flash, monkeypatch):
    """Mistral-like window 7, kv_policy=routed, skipped tokens: the flash path counted the window in compacted
    slots (wrong keys); now such calls never go to flash, and the output equals the mask-mode reference."""
    ids, mask = batch(seed=3, seq_len=24, padding=padding)
    reference = build("mistral", mode="mask", kv_policy="routed", skip_shift=0.5)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits[mask.bool()]
    got = forced_flash_logits("mistral", torch.float32, monkeypatch, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert all(w == (-1, -1) for w in fake_flash)  # nothing windowed ever reached flash


def test_bf16_flash_serves_unwindowed_routed_and_flex_the_windowed(fake_flash, monkeypatch):
    """bf16 with flash 'installed': an unwindowed routed model goes through flash (== the SDPA path), a windowed
    one never does (flex serves it, == the SDPA path)."""
    ids, mask = batch(seed=4, seq_len=24, padding="right")
    for family, flash_used in (("llama_gqa", True), ("mistral", False)):
        fake_flash.clear()
        with torch.no_grad():
            sdpa = build(family, mode="capacity", kv_policy="routed", skip_shift=0.5,
                         attn_backend="sdpa").to(torch.bfloat16)
            want = sdpa(ids, attention_mask=mask).logits[mask.bool()].float()
        got = forced_flash_logits(family, torch.bfloat16, monkeypatch, ids, mask)
        assert bool(fake_flash) == flash_used, family
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- FlexAttention

@pytest.mark.parametrize("family", ["llama_mha", "llama_gqa", "mistral"])
@pytest.mark.parametrize("policy", ["all", "routed"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_flex_equals_sdpa_equals_mask(family, policy, padding):
    ids, mask = batch(seed=3, padding=padding)
    with torch.no_grad():
        expected = build(family, mode="mask", kv_policy=policy, skip_shift=0.5)(ids, attention_mask=mask) \
            .logits[mask.bool()]
        for mode, capacity in (("mask", 1.0), ("capacity", 1.0), ("capacity", 0.8)):
            outs = {}
            for backend in ("sdpa", "flex"):
                model = build(family, mode=mode, capacity=capacity, kv_policy=policy, skip_shift=0.5,
                              attn_backend=backend, inference_slots="static")
                outs[backend] = model(ids, attention_mask=mask).logits[mask.bool()]
                stats = routing_context(model).stats
            torch.testing.assert_close(outs["flex"], outs["sdpa"], atol=1e-5, rtol=1e-5)
            overflow = any(bool((s[k]["decided"] != s[k]["executed"]).item()) for s in stats.values()
                           for k in ("attn", "mlp"))
            if not overflow:
                torch.testing.assert_close(outs["flex"], expected, atol=1e-5, rtol=1e-5)


def test_flex_unit_matches_allowed_mask_with_window_gqa_and_empty_rows():
    gen = torch.Generator().manual_seed(1)
    b, h, hkv, rows, keys, d = 2, 6, 3, 11, 17, 8
    q = torch.randn(b, h, rows, d, generator=gen)
    k, v = (torch.randn(b, hkv, keys, d, generator=gen) for _ in range(2))
    k_pos = torch.arange(keys).expand(b, keys)
    q_pos = torch.sort(torch.randperm(keys, generator=gen)[:rows]).values.expand(b, rows).contiguous()
    k_valid = torch.rand(b, keys, generator=gen) < 0.8
    for window in (None, 4):
        got = flex_attention_call(q, k, v, q_pos, k_pos, k_valid, window, 0.4)
        want = sdpa_attention(q, k, v, q_pos, k_pos, k_valid, window, 0.4)
        allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
        if window is not None:
            allowed &= q_pos[:, :, None] - k_pos[:, None, :] < window
        has_key = allowed.any(-1)[:, None, :, None].expand_as(got)  # empty rows: discarded by callers
        torch.testing.assert_close(got[has_key], want[has_key], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(got).all()


def count_block_masks(monkeypatch):
    made = []
    real = attention.create_block_mask

    def counting(mask_mod, *args, **kwargs):
        made.append(mask_mod)
        return real(mask_mod, *args, **kwargs)

    monkeypatch.setattr(attention, "create_block_mask", counting)
    return made


def test_block_mask_built_once_per_forward_when_layers_share_queries_and_keys(monkeypatch):
    """kv_policy=all, mask mode, no KV cache (a training forward): every layer's queries and keys are the same
    tensors: one block mask per forward for all 3 layers. Capacity mode: each layer's query slots differ, so one
    per layer. (With a KV cache the keys are each layer's own cache entries: one per layer too.)"""
    made = count_block_masks(monkeypatch)
    ids, mask = batch(seed=3, padding="left")
    model = build("llama_gqa", mode="mask", kv_policy="all", skip_shift=0.5, attn_backend="flex")
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
        assert len(made) == 1
        model(ids, attention_mask=mask, use_cache=False)  # the pre-hook clears the per-forward dict: built again
        assert len(made) == 2
    made.clear()
    model = build("llama_gqa", mode="capacity", capacity=0.8, kv_policy="all", skip_shift=0.5, attn_backend="flex",
                  inference_slots="static")
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    assert len(made) == 3  # (3 layers, each with its own query slots)


def test_mask_mod_reads_only_position_vectors(monkeypatch):
    made = count_block_masks(monkeypatch)
    ids, mask = batch(seed=3, padding="right")
    for policy in ("all", "routed"):
        model = build("mistral", mode="capacity", kv_policy=policy, skip_shift=0.5, attn_backend="flex",
                      inference_slots="static")
        with torch.no_grad():
            model(ids, attention_mask=mask)
    assert made
    for mask_mod in made:
        captured = [cell.cell_contents for cell in mask_mod.__closure__ or ()]
        tensors = [c for c in captured if isinstance(c, torch.Tensor)]
        assert len(tensors) == 3 and all(t.dim() == 2 for t in tensors), [t.shape for t in tensors]
        assert all(not isinstance(c, torch.Tensor) or c.dim() <= 2 for c in captured)
    assert made[0].__qualname__.startswith(position_mask_mod.__name__)


@pytest.mark.parametrize("policy", ["all", "routed"])
def test_flex_with_cache_prefill_and_decode_equals_full_forward(policy):
    """attn_backend=flex through a KV cache (positions and flags from the cache), with padding == one forward."""
    ids, mask = batch(seed=11, padding="left", seq_len=15)
    model = build("mistral", mode="capacity", kv_policy=policy, skip_shift=0.5, attn_backend="flex")
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :9], attention_mask=mask[:, :9], use_cache=True)
        pieces, cache = [out.logits], out.cache
        for t in range(9, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.cache
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], atol=1e-5, rtol=1e-5)


def test_softcapped_calls_never_reach_a_backend_that_ignores_the_cap():
    """Soft-capped attention (Gemma 2): sdpa and flash cannot apply the cap, so they never serve; math takes sdpa's
    place and flex stays where it was chosen."""
    for c, plain in all_choices():
        args = (c["requested"], c["device"], c["dtype"], c["compacted"], c["window"], c["cache"], c["static"],
                c["flash_ok"], c["flex_ok"])
        with _no_raise():
            got = choose_backend(*args, softcap=2.0)
        assert backend_choice.BACKENDS[got].softcap and got in ("math", "flex"), c
        if plain == "flex" or (plain == "sdpa" and got != "flex"):
            assert got == {"flex": "flex", "sdpa": "math"}[plain], c


def test_softcapped_flex_equals_the_math_path(policy="all"):
    """Gemma 2 (soft cap 2.0, sliding/full layers): capacity through flex (the cap as a score_mod) == mask mode
    through the CPU math path. (Routing disabled == the plain, capping, eager HF model: tests/test_families.py.)"""
    ids, mask = batch(seed=3, padding="left", seq_len=12)
    with torch.no_grad():
        want = build("gemma2", mode="mask", kv_policy=policy, skip_shift=0.5)(ids, attention_mask=mask) \
            .logits[mask.bool()]
        model = build("gemma2", mode="capacity", capacity=1.0, kv_policy=policy, skip_shift=0.5,
                      attn_backend="flex", inference_slots="static")
        got = model(ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_softcapped_blocked_cpu_paths_equal_plain_hf(monkeypatch, padding):
    """Gemma 2 through the CPU blocked paths with the soft-capping kernel (4-row blocks cut through its window 5
    and the padding; without padding the prefix path): routing disabled == the plain HF model (eager, capping)."""
    monkeypatch.setattr(attention, "SDPA_QUERY_BLOCK", 4)
    ids, mask = batch(seed=7, padding=padding, batch_size=2, seq_len=23)
    torch.manual_seed(0)
    model = FAMILIES["gemma2"]().float().eval()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits[mask.bool()]
        attach_routers(model, RouterConfig(mode="capacity"))
        with routing_disabled(model):
            got = model(ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cpu_sdpa_path_unchanged_by_chooser():
    """auto on CPU is the SDPA path, whatever the dtype and routing."""
    for dtype, compacted, window, cache in itertools.product(DTYPES, (False, True), (None, 7), (False, True)):
        assert choose_backend("auto", "cpu", dtype, compacted, window, cache, True, True, True) == "sdpa"
