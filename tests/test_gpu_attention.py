"""GPU attention back ends inside routed blocks (issue #15 items 4 and 5). Marked `gpu`: skipped without CUDA
(tests/conftest.py); run by scripts/gpu_check.sh on a GPU node.

Everything runs in bf16 on cuda (flash-attn takes fp16/bf16 only). Tolerance: atol = rtol = 2e-2, against an
fp32 reference of the same inputs (kernels) or between back ends of the same bf16 model (models); router
decisions are fixed per token (routers replaced by constant logits), so no gate can flip on bf16 noise.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

BF16_TOL = dict(atol=2e-2, rtol=2e-2)
DEVICE = "cuda"


def _inputs(seed, batch=2, heads=8, kv_heads=2, slots=300, head_dim=64):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, heads, slots, head_dim, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, kv_heads, slots, head_dim, device=DEVICE, generator=gen, dtype=torch.bfloat16)
            for _ in range(2))
    real = torch.rand(batch, slots, device=DEVICE, generator=gen) < 0.7
    real[:, 0] = True
    real[1, -40:] = False  # padding slots at the end of one row
    # compacted slots: increasing original positions with gaps (skipped tokens)
    gaps = torch.randint(1, 3, (batch, slots), device=DEVICE, generator=gen)
    pos = gaps.cumsum(dim=1) - 1
    return q, k, v, real, pos


def _reference(q, k, v, q_pos, k_pos, k_valid, window, scale):
    from skipgpt_dist.routing.attention import allowed_mask

    mask = allowed_mask(q_pos, k_pos, k_valid, window)
    rep = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1), attn_mask=mask,
        scale=scale)


@pytest.mark.parametrize("window", [None, 48])
def test_kernels_agree_in_bf16_on_compacted_slots(window):
    """kv_policy=routed slots (keys = the real query slots): SDPA, flex (and flash, unwindowed, when installed)
    == the fp32 reference on every real query."""
    from skipgpt_dist.routing.attention import flash_varlen_attention, flex_attention_call, sdpa_attention

    q, k, v, real, pos = _inputs(0)
    scale = q.shape[-1] ** -0.5
    want = _reference(q, k, v, pos, pos, real, window, scale)
    rows = real[:, None, :, None].expand_as(want)
    got = {"sdpa": sdpa_attention(q, k, v, pos, pos, real, window, scale),
           "flex": flex_attention_call(q, k, v, pos, pos, real, window, scale)}
    if window is None:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            pass
        else:
            got["flash"] = flash_varlen_attention(q, k, v, real, real, scale)
    for name, out in got.items():
        assert out.dtype == torch.bfloat16, name
        torch.testing.assert_close(out.float()[rows], want[rows], **BF16_TOL, msg=name)


@pytest.mark.parametrize("window", [None, 48])
def test_kernels_agree_in_bf16_on_gathered_queries(window):
    """kv_policy=all: gathered queries over every token's key, with padding keys: SDPA == flex == fp32."""
    from skipgpt_dist.routing.attention import flex_attention_call, sdpa_attention

    q, k, v, real, _ = _inputs(1)
    keys = k.shape[2]
    k_pos = torch.arange(keys, device=DEVICE).expand(2, keys)
    k_valid = torch.ones(2, keys, dtype=torch.bool, device=DEVICE)
    k_valid[1, :25] = False  # left padding
    idx = torch.sort(torch.rand(2, keys, device=DEVICE).topk(200, dim=1).indices, dim=1).values
    q_pos = k_pos.gather(1, idx)
    qs = q[:, :, :200].contiguous()
    scale = q.shape[-1] ** -0.5
    want = _reference(qs, k, v, q_pos, k_pos, k_valid, window, scale)
    has_key = (k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])).any(-1)
    rows = has_key[:, None, :, None].expand_as(want)
    for name, out in (("sdpa", sdpa_attention(qs, k, v, q_pos, k_pos, k_valid, window, scale)),
                      ("flex", flex_attention_call(qs, k, v, q_pos, k_pos, k_valid, window, scale))):
        torch.testing.assert_close(out.float()[rows], want[rows], **BF16_TOL, msg=name)


def test_sdpa_reads_grouped_kv_heads_natively_where_a_fused_kernel_allows():
    from skipgpt_dist.routing.attention import _grouped_kv, sdpa_unmasked

    q, k, v, _, _ = _inputs(2)
    k2, v2, native = _grouped_kv(q, k, v)  # no mask: the flash kernel takes GQA (torch >= 2.5)
    assert native and k2 is k and v2 is v
    rep = q.shape[1] // k.shape[1]
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                                            v.repeat_interleave(rep, 1))
    torch.testing.assert_close(sdpa_unmasked(q, k, v, None), want, **BF16_TOL)


def _tiny(family: str, window=None):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=window, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.to(device=DEVICE, dtype=torch.bfloat16).eval()


def _fixed_routers(model, batch, seq_len, seed=7):
    """Replace every router by constant logits per (layer, kind, token): ~70% execute, the same in every run."""
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for name in ("skipgpt_attn_router", "skipgpt_mlp_router"):
            logits = torch.zeros(batch, seq_len, 2)
            logits[..., 1] = torch.rand(batch, seq_len, generator=gen) - 0.7
            table = logits.to(DEVICE)
            getattr(layer, name).forward = lambda *args, _t=table, **kwargs: _t


def _run(family, window, backend, mode, policy, ids, mask):
    from skipgpt_dist import RouterConfig, attach_routers

    model = _tiny(family, window)
    attach_routers(model, RouterConfig(mode=mode, capacity=1.0, kv_policy=policy, attn_backend=backend,
                                       inference_slots="static"))
    _fixed_routers(model, *ids.shape)
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).logits.float()


@pytest.mark.parametrize("family, window", [("llama", None), ("mistral", 64)])
@pytest.mark.parametrize("policy", ["all", "routed"])
def test_capacity_equals_mask_in_bf16_on_every_backend(family, window, policy, monkeypatch):
    """capacity == mask in bf16, on auto (flex for kv_policy=all; flash for unwindowed routed when installed,
    else flex), sdpa and flex; a Mistral window (64) that bites at 256 tokens. Also which back end auto ran."""
    import skipgpt_dist.routing.attention_spec as spec_mod  # (where the routed call dispatches)

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 256), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, -30:] = 0
    real = mask.bool()
    reference = _run(family, window, "sdpa", "mask", policy, ids, mask)[real]
    ran = []
    for name in ("flash_varlen_attention", "flex_attention_call", "sdpa_attention", "sdpa_prefix_attention"):
        real_fn = getattr(spec_mod, name)
        monkeypatch.setattr(spec_mod, name, lambda *a, _f=real_fn, _n=name, **k: (ran.append(_n), _f(*a, **k))[1])
    for backend in ("auto", "sdpa", "flex"):
        ran.clear()
        got = _run(family, window, backend, "capacity", policy, ids, mask)[real]
        torch.testing.assert_close(got, reference, **BF16_TOL, msg=f"{backend}")
        if backend == "auto":
            from skipgpt_dist.routing.attention import flash_attn_available

            flash = policy == "routed" and window is None and flash_attn_available()
            assert set(ran) == {"flash_varlen_attention" if flash else "flex_attention_call"}, ran
        assert "flash_varlen_attention" not in ran or window is None


def test_softcapped_gemma2_on_gpu_never_runs_sdpa_and_equals_mask(monkeypatch):
    """Gemma 2 (attention logit soft-cap, sliding/full layers) in bf16: capacity == mask on auto (flex with the cap
    as a score_mod for kv_policy=all; math where flex cannot serve) and on an explicit sdpa request (served by
    math: SDPA would drop the cap); no call ever reaches SDPA or flash."""
    import skipgpt_dist.routing.attention as attention
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from skipgpt_dist import RouterConfig, attach_routers

    used = []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: used.append("sdpa"))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 192), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, -30:] = 0
    outs = {}
    for mode, backend in (("mask", "auto"), ("capacity", "auto"), ("capacity", "sdpa")):
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(
            hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
            head_dim=32, vocab_size=128, sliding_window=64, attn_logit_softcapping=2.0, initializer_range=0.2,
            max_position_embeddings=512)).to(device=DEVICE, dtype=torch.bfloat16).eval()
        attach_routers(model, RouterConfig(mode=mode, capacity=1.0, attn_backend=backend, inference_slots="static"))
        _fixed_routers(model, *ids.shape)
        with torch.no_grad():
            outs[(mode, backend)] = model(ids, attention_mask=mask, use_cache=False).logits.float()[mask.bool()]
    assert not used
    for key in (("capacity", "auto"), ("capacity", "sdpa")):
        torch.testing.assert_close(outs[key], outs[("mask", "auto")], **BF16_TOL, msg=str(key))
