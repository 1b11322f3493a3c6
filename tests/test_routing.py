"""Routed model core: design.md invariants 1 (capacity == mask) and 2 (cached decode == full forward)."""
import math

import pytest
import torch

from routing_models import FAMILIES, batch, build, logits_on_real, scramble_routers, train_step_grads
from skipgpt_dist import (RouterConfig, SkipGPTError, attach_routers, count_router_parameters, load_routers,
                          routing_context, routing_disabled, routing_stats, save_routers, sparsity_loss)
from skipgpt_dist.routing.gates import hashed_uniform

POLICIES = ("all", "routed")
# The full invariant grids run on the Llama-block families; the others (Qwen3's q/k norms, Gemma 2's sandwich norms,
# windows and soft-capping, Phi-3's fused projections and partial RoPE, Mixtral's MoE) on a cheap slice here, and
# through every invariant in the per-family conformance suite (tests/test_families.py).
LLAMA_BLOCK = ("llama_mha", "llama_gqa", "mistral", "qwen2")
OTHER_FAMILIES = tuple(sorted(set(FAMILIES) - set(LLAMA_BLOCK)))
PADDINGS = ("none", "left", "right")
SLOTS = ("static", "dynamic")  # routers.inference_slots: what capacity mode does in these no-grad eval forwards


FORWARD_GRID = [(f, pol, pad, slots) for f in LLAMA_BLOCK for pol in POLICIES for pad in PADDINGS for slots in SLOTS] \
    + [(f, pol, pad, "static") for f in OTHER_FAMILIES for pol in POLICIES for pad in ("left", "right")]


@pytest.mark.parametrize("family, policy, padding, slots", FORWARD_GRID)
def test_capacity_equals_mask_forward(family, policy, padding, slots):
    ids, mask = batch(seed=3, padding=padding)
    reference = build(family, mode="mask", kv_policy=policy, skip_shift=0.5)
    with torch.no_grad():
        expected = logits_on_real(reference, ids, mask)
        ref_sparsity = routing_stats(reference)["sparsity"]
        assert 0.15 < ref_sparsity < 0.7, "routers must really skip for this test to mean anything"
        for capacity in (1.0, 0.8):
            routed = build(family, mode="capacity", capacity=capacity, kv_policy=policy, skip_shift=0.5,
                           inference_slots=slots)
            got = logits_on_real(routed, ids, mask)
            stats = routing_stats(routed)
            if any(layer[kind]["overflow"] for layer in stats["layers"] for kind in ("attn", "mlp")):
                continue  # the invariant only holds when nothing overflows
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert stats["sparsity"] == pytest.approx(ref_sparsity)


def test_capacity_below_one_is_exercised_without_overflow():
    """Guards the test above from silently skipping its capacity < 1 case."""
    ids, mask = batch(seed=3, padding="left")
    model = build("llama_gqa", mode="capacity", capacity=0.8, skip_shift=0.5, inference_slots="static")
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert all(layer[k]["overflow"] == 0 for layer in routing_stats(model)["layers"] for k in ("attn", "mlp"))


# (mask estimator, capacity estimator) pairs that must agree when every token has a slot: the executed-token
# gradient, and the probe estimator, which then probes every skipped token with weight 1 = mask's dense gradient
ESTIMATOR_PAIRS = (("executed", "executed"), ("dense", "probe"))


GRADIENT_GRID = [(f, pol, pad, est) for f in ("llama_gqa", "mistral", "qwen2") for pol in POLICIES
                 for pad in ("none", "left") for est in ESTIMATOR_PAIRS] \
    + [(f, pol, "left", ESTIMATOR_PAIRS[0]) for f in OTHER_FAMILIES for pol in POLICIES]


@pytest.mark.parametrize("family, policy, padding, estimators", GRADIENT_GRID,
                         ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
def test_capacity_equals_mask_router_gradients(family, policy, padding, estimators):
    ids, mask = batch(seed=5, padding=padding)
    loss_mask, grads_mask = train_step_grads(build(family, mode="mask", kv_policy=policy, gate_grad=estimators[0]),
                                             ids, mask)
    loss_cap, grads_cap = train_step_grads(build(family, mode="capacity", capacity=1.0, kv_policy=policy,
                                                 gate_grad=estimators[1]), ids, mask)
    torch.testing.assert_close(loss_cap, loss_mask, atol=1e-5, rtol=1e-5)
    assert grads_mask.keys() == grads_cap.keys() and len(grads_mask) == 4 * 3
    for name in grads_mask:
        assert grads_mask[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_cap[name], grads_mask[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama_gqa", "mistral"])
@pytest.mark.parametrize("policy", POLICIES)
def test_mask_mode_matches_token_by_token_oracle(family, policy):
    """The reference itself is checked against a literal reading of the semantics."""
    ids, mask = batch(seed=7, padding="left", batch_size=2, seq_len=11)
    model = build(family, mode="mask", kv_policy=policy, mlp_router_input="mlp_input")
    with torch.no_grad():
        expected = oracle_forward(model, ids, mask, policy)
        got = model.model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama_gqa", "mistral"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("padding", ["none", "left", "no mask"])
def test_blocked_cpu_attention_matches_the_oracle(monkeypatch, family, policy, padding):
    """The CPU path that splits queries into blocks, each attending only its key range (sdpa_attention, and
    sdpa_prefix_attention when the keys are every position, all valid), against the literal semantics, in mask
    and capacity mode. A 4-row block: blocks cut through the sequence, the window (mistral: 7) and the padding."""
    monkeypatch.setattr("skipgpt_dist.routing.attention.SDPA_QUERY_BLOCK", 4)
    ids, mask = batch(seed=7, padding="none" if padding == "no mask" else padding, batch_size=2, seq_len=23)
    model = build(family, mode="mask", kv_policy=policy, mlp_router_input="mlp_input")
    with torch.no_grad():
        expected = oracle_forward(model, ids, mask, policy)[mask.bool()]
        for mode in ("mask", "capacity"):
            routing_context(model).cfg = RouterConfig(mode=mode, capacity=1.0, kv_policy=policy,
                                                     mlp_router_input="mlp_input", inference_slots="static")
            got = model.model(ids, attention_mask=None if padding == "no mask" else mask).last_hidden_state
            torch.testing.assert_close(got[mask.bool()], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("padding", ["none", "left"])
def test_blocked_cpu_attention_router_gradients_equal_one_block(monkeypatch, policy, padding):
    ids, mask = batch(seed=5, padding=padding, seq_len=23)
    loss, grads = train_step_grads(build("mistral", mode="capacity", capacity=1.0, kv_policy=policy), ids, mask)
    monkeypatch.setattr("skipgpt_dist.routing.attention.SDPA_QUERY_BLOCK", 4)
    loss_blocked, grads_blocked = train_step_grads(build("mistral", mode="capacity", capacity=1.0, kv_policy=policy),
                                                   ids, mask)
    torch.testing.assert_close(loss_blocked, loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_blocked[name], grads[name], atol=1e-5, rtol=1e-4)


def oracle_forward(model, ids, mask, policy):
    base = model.model
    h = base.embed_tokens(ids)
    batch_size, seq_len, _ = h.shape
    pos = torch.arange(seq_len)[None].expand(batch_size, -1)
    cos, sin = base.rotary_emb(h, position_ids=pos)
    valid = mask.bool()

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos[:, None] + torch.cat((-t[..., half:], t[..., :half]), -1) * sin[:, None]

    for layer in base.layers:
        attn, shape, window = layer.self_attn, layer._skipgpt.shape, layer._skipgpt.window
        router_logits = layer.skipgpt_attn_router(h)
        g_attn = (router_logits[..., 0] > router_logits[..., 1]) & valid
        x = layer.input_layernorm(h)
        split = lambda t: t.view(batch_size, seq_len, -1, shape.head_dim).transpose(1, 2)
        q, k, v = rope(split(attn.q_proj(x))), rope(split(attn.k_proj(x))), split(attn.v_proj(x))
        group = shape.heads // shape.kv_heads
        out = torch.zeros(batch_size, seq_len, shape.heads * shape.head_dim)
        for b in range(batch_size):
            for t in range(seq_len):
                if not g_attn[b, t]:
                    continue
                keys = [j for j in range(t + 1) if valid[b, j] and (policy == "all" or g_attn[b, j])
                        and (window is None or t - j < window)]
                for head in range(shape.heads):
                    weights = torch.softmax(q[b, head, t] @ k[b, head // group, keys].T * layer._skipgpt.scale, -1)
                    out[b, t, head * shape.head_dim:(head + 1) * shape.head_dim] = weights @ v[b, head // group, keys]
        h = h + g_attn[..., None] * attn.o_proj(out)
        router_logits = layer.skipgpt_mlp_router(h)  # mlp_router_input=mlp_input
        g_mlp = (router_logits[..., 0] > router_logits[..., 1]) & valid
        h = h + g_mlp[..., None] * layer.mlp(layer.post_attention_layernorm(h))
    return base.norm(h)


@pytest.mark.parametrize("mode", ["mask", "capacity"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_all_execute_routers_reproduce_the_dense_model(mode, padding):
    ids, mask = batch(seed=9, padding=padding)
    model = build("qwen2", mode=mode, capacity=1.0)
    with torch.no_grad():
        routed = logits_on_real(model, ids, mask)
        with routing_disabled(model):
            dense = logits_on_real(model, ids, mask)
        assert routing_stats(model)["sparsity"] == 0.0
    plain = FAMILIES["qwen2"]
    torch.manual_seed(0)
    original = plain().float().eval()
    with torch.no_grad():
        torch.testing.assert_close(dense, logits_on_real(original, ids, mask), atol=1e-5, rtol=1e-5)
    assert (routed - dense).abs().max() > 1e-3, "routing must change the output"


def incremental_logits(model, ids, mask, prefill):
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    return torch.cat(pieces, dim=1), cache


@pytest.mark.parametrize("family", LLAMA_BLOCK)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode, slots", [("mask", "dynamic"), ("capacity", "static"), ("capacity", "dynamic")])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_cached_decode_equals_full_forward(family, policy, mode, slots, padding):
    ids, mask = batch(seed=11, padding=padding, seq_len=15)
    model = build(family, mode=mode, capacity=1.0, kv_policy=policy, inference_slots=slots)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        stepped, cache = incremental_logits(model, ids, mask, prefill=5)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]
    if policy == "routed":
        stored = sum(int(layer.key_valid.sum()) for layer in cache.layers)
        assert stored < int(real.sum()) * len(cache.layers), "routed cache must hold only executed tokens"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("slots", SLOTS)
def test_generate_with_kv_cache_matches_uncached(policy, slots):
    ids, mask = batch(seed=13, padding="left", batch_size=2, seq_len=9)
    model = build("llama_gqa", mode="capacity", capacity=1.0, kv_policy=policy, inference_slots=slots)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)


# ---- dynamic inference slots (capacity mode, eval, no autograd) --------------------------------------------------

@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "qwen2"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_dynamic_inference_equals_mask_even_where_static_slots_overflow(family, policy, padding):
    ids, mask = batch(seed=27, padding=padding)
    with torch.no_grad():
        expected = logits_on_real(build(family, mode="mask", kv_policy=policy, skip_shift=0.5), ids, mask)
        overflow = {}
        for slots in SLOTS:
            model = build(family, mode="capacity", capacity=0.3, kv_policy=policy, skip_shift=0.5,
                          inference_slots=slots)
            got = logits_on_real(model, ids, mask)
            overflow[slots] = sum(layer[k]["overflow"] for layer in routing_stats(model)["layers"]
                                  for k in ("attn", "mlp"))
    assert overflow["static"] > 0 and overflow["dynamic"] == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # got: the dynamic model


def call_counter(modules: dict) -> tuple[dict, list]:
    """Forward hooks counting calls per name; returns (counts, handles)."""
    counts = dict.fromkeys(modules, 0)
    handles = [m.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
               for name, m in modules.items()]
    return counts, handles


def force_skip(router) -> None:
    with torch.no_grad():
        router.net.weight.zero_()
        router.net.bias.copy_(torch.tensor([-50.0, 50.0]))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("slots, use_cache", [("dynamic", False), ("dynamic", True), ("static", True)])
def test_a_sublayer_no_token_executes_does_not_run(policy, slots, use_cache):
    ids, mask = batch(seed=29, padding="left")
    model = build("llama_gqa", mode="capacity", capacity=0.75, kv_policy=policy, inference_slots=slots)
    reference = build("llama_gqa", mode="mask", kv_policy=policy)
    for m in (model, reference):
        force_skip(m.model.layers[1].skipgpt_attn_router)
        force_skip(m.model.layers[2].skipgpt_mlp_router)
    attn = model.model.layers[1].self_attn
    counts, handles = call_counter({"q": attn.q_proj, "k": attn.k_proj, "o": attn.o_proj,
                                    "mlp": model.model.layers[2].mlp, "other_mlp": model.model.layers[1].mlp})
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=use_cache)
        expected = reference(ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(out.logits[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    if slots == "static":
        assert counts == {"q": 1, "k": 1, "o": 1, "mlp": 1, "other_mlp": 1}
        return
    # kv_policy=all: skipped tokens still store their keys/values for later queries (only with a cache)
    writes_kv = int(use_cache and policy == "all")
    assert counts == {"q": 0, "k": writes_kv, "o": 0, "mlp": 0, "other_mlp": 1}
    if use_cache:
        layer = out.cache.layers[1]
        stored = 0 if layer.key_valid is None else int(layer.key_valid.sum())
        assert stored == (int(mask.sum()) if policy == "all" else 0) and layer.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "qwen2"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("batch_size, padding", [(1, "none"), (3, "left")])
def test_dynamic_prefill_and_decode_equal_the_full_forward(family, policy, batch_size, padding):
    """Token-by-token decode with whole sublayers skipped (a skipped decode token runs nothing) == one forward."""
    ids, mask = batch(seed=31, padding=padding, batch_size=batch_size, seq_len=16)
    model = build(family, mode="capacity", capacity=0.5, kv_policy=policy, skip_shift=1.0)
    reference = build(family, mode="mask", kv_policy=policy, skip_shift=1.0)
    layers = model.model.layers
    sublayers = {**{("mlp", i): layer.mlp for i, layer in enumerate(layers)},
                 **{("attn", i): layer.self_attn.o_proj for i, layer in enumerate(layers)}}
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        expected = reference(ids, attention_mask=mask).logits
        counts, handles = call_counter(sublayers)
        stepped, cache = incremental_logits(model, ids, mask, prefill=6)
    for h in handles:
        h.remove()
    real = mask.bool()
    torch.testing.assert_close(full[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepped[real], full[real], atol=1e-5, rtol=1e-5)
    forwards = 1 + ids.shape[1] - 6
    for kind in ("attn", "mlp"):
        calls = sum(n for (k, _), n in counts.items() if k == kind)
        assert calls < forwards * len(layers), f"some decode step must skip a whole {kind} sublayer"
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("policy", POLICIES)
def test_skipped_attention_leaves_the_block_input_untouched(policy):
    """With attention skipped the MLP adds into the block's input tensor itself unless it copies: the hidden
    states the model reports (inputs of later blocks) must still equal the reference's."""
    ids, mask = batch(seed=35)
    model = build("llama_gqa", mode="capacity", capacity=0.75, kv_policy=policy)
    reference = build("llama_gqa", mode="mask", kv_policy=policy)
    for m in (model, reference):
        force_skip(m.model.layers[1].skipgpt_attn_router)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        expected = reference(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eval_forward_that_records_router_gradients_keeps_static_slots():
    ids, mask = batch(seed=33)
    model = build("llama_mha", mode="capacity", capacity=0.5)
    for name, param in model.named_parameters():
        param.requires_grad_("skipgpt_" in name)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    dynamic_overflow = sum(layer["attn"]["overflow"] for layer in routing_stats(model)["layers"])
    model(ids, attention_mask=mask).logits.sum().backward()
    static_overflow = sum(layer["attn"]["overflow"] for layer in routing_stats(model)["layers"])
    assert dynamic_overflow == 0 < static_overflow
    assert model.model.layers[0].skipgpt_attn_router.net.weight.grad is not None


def test_eval_is_deterministic_and_training_is_noisy():
    ids, mask = batch(seed=15)
    model = build("llama_mha", mode="capacity", capacity=1.0)
    with torch.no_grad():
        first = model(ids, attention_mask=mask).logits
        second = model(ids, attention_mask=mask).logits
        assert torch.equal(first, second)
        model.train()
        noisy = [model(ids, attention_mask=mask).logits for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1]), "successive training forwards draw fresh Gumbel noise"


def test_noise_is_a_function_of_the_token_not_the_batch():
    pos = torch.arange(7)[None].expand(4, -1)
    ids = torch.tensor([10, 11, 12, 13])
    full = hashed_uniform(1, 2, ids, 3, 0, pos)
    halves = torch.cat([hashed_uniform(1, 2, ids[:2], 3, 0, pos[:2]), hashed_uniform(1, 2, ids[2:], 3, 0, pos[2:])])
    assert torch.equal(full, halves)
    assert ((full > 0) & (full < 1)).all()
    big = hashed_uniform(0, 0, torch.arange(64), 0, 0, torch.arange(256)[None].expand(64, -1))
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.std().item() - math.sqrt(1 / 12)) < 0.01
    assert not torch.equal(hashed_uniform(1, 3, ids, 3, 0, pos), full)


def test_expert_choice_runs_exactly_k_tokens():
    ids, mask = batch(seed=17, seq_len=20)
    model = build("llama_mha", mode="expert_choice", capacity=0.6)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for layer in routing_stats(model)["layers"]:
        assert layer["attn"]["execute"] == pytest.approx(12 / 20)
        assert layer["mlp"]["execute"] == pytest.approx(12 / 20)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backend_matches_sdpa():
    ids, mask = batch(seed=19, padding="left")
    with torch.no_grad():
        for policy in POLICIES:
            sdpa = logits_on_real(build("mistral", mode="capacity", capacity=0.9, kv_policy=policy), ids, mask)
            flex = logits_on_real(build("mistral", mode="capacity", capacity=0.9, kv_policy=policy,
                                        attn_backend="flex"), ids, mask)
            torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_router_parameter_count():
    for router_type, per_router in (("linear", lambda d: 2 * d + 2),
                                    ("mlp", lambda d: d * (d // 4) + d // 4 + (d // 4) * 2 + 2)):
        model = build("llama_gqa", router_type=router_type)
        layers, d = model.config.num_hidden_layers, model.config.hidden_size
        assert count_router_parameters(model) == 2 * layers * per_router(d)


@pytest.mark.parametrize("router_type", ["linear", "mlp"])
def test_router_reads_its_input_at_unit_rms(router_type):
    """Routers scale their Linear's outputs by 1/RMS(h) instead of its input: the same logits as normalising h."""
    from skipgpt_dist.routing.routers import Router

    torch.manual_seed(0)
    router = Router(48, router_type)
    with torch.no_grad():
        for param in router.parameters():
            param.copy_(torch.randn(param.shape))
    h = torch.randn(2, 5, 48) * torch.tensor([0.01, 1.0, 300.0, 1.0, 1.0])[None, :, None]
    h[1, 0] = 0.0  # a zero state (e.g. a zero embedding row) must stay finite, in value and gradient
    h.requires_grad_(True)
    reference = router.net(h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-6))
    got = router(h)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_sparsity_loss_pulls_towards_target():
    ids, mask = batch(seed=21)
    model = build("llama_mha", mode="capacity", capacity=1.0, target_sparsity=0.9)
    model.train()
    model(ids, attention_mask=mask)
    loss = sparsity_loss(model)
    executed = 1 - routing_stats(model)["sparsity"]
    assert loss.item() == pytest.approx(8.0 * abs(0.1 - executed), rel=1e-5)
    loss.backward()
    bias = model.model.layers[0].skipgpt_attn_router.net.bias.grad
    assert bias[0] > 0 > bias[1], "too many executions: the gradient must push logits towards skip"


def test_save_and_load_routers_round_trip(tmp_path):
    ids, mask = batch(seed=23)
    source = build("qwen2", seed=1)
    target = build("qwen2", seed=1)
    scramble_routers(target, seed=99)
    path = tmp_path / "routers.safetensors"
    save_routers(source, path)
    with torch.no_grad():
        assert not torch.equal(logits_on_real(source, ids, mask), logits_on_real(target, ids, mask))
        cfg = load_routers(target, path)
        torch.testing.assert_close(logits_on_real(target, ids, mask), logits_on_real(source, ids, mask))
    assert cfg == source._skipgpt_ctx.cfg


# ---- bad input: one clear error naming the fix ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    (dict(capacity=0.0), "capacity"), (dict(capacity=1.5), "capacity"), (dict(mode="dense"), "mode"),
    (dict(kv_policy="none"), "kv_policy"), (dict(attn_backend="xformers"), "attn_backend"),
    (dict(router_type="conv"), "router_type"), (dict(gate_grad="dense", mode="capacity"), "gate_grad"),
    (dict(inference_slots="auto"), "inference_slots"),
])
def test_bad_router_config_is_one_line_error(kwargs, needle):
    with pytest.raises(SkipGPTError) as err:
        RouterConfig(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_flash_without_flash_attn_or_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the refusal is for machines without one")
    with pytest.raises(SkipGPTError, match="flash-attn"):
        build("llama_mha", attn_backend="flash", kv_policy="routed")


def test_attaching_twice_is_refused():
    model = build("llama_mha")
    with pytest.raises(SkipGPTError, match="already attached"):
        attach_routers(model, RouterConfig())


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(SkipGPTError, match="gemma2, llama, mistral, mixtral, phi3, qwen2, qwen3"):
        attach_routers(model, RouterConfig())


def test_router_file_for_another_model_shape_is_refused(tmp_path):
    path = tmp_path / "routers.safetensors"
    save_routers(build("llama_mha"), path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=50))
    attach_routers(other, RouterConfig())
    with pytest.raises(SkipGPTError, match="this model has 2 layers"):
        load_routers(other, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SkipGPTError, match="not a readable safetensors"):
        load_routers(other, tmp_path / "junk.safetensors")


@pytest.mark.gpu
def test_flash_and_flex_on_gpu_match_sdpa():
    ids, mask = batch(seed=25, padding="left")
    ids, mask = ids.cuda(), mask.cuda()
    for policy, backend in (("routed", "flash"), ("all", "flex"), ("routed", "flex")):
        results = []
        for chosen in ("sdpa", backend):
            model = build("llama_gqa", mode="capacity", capacity=0.9, kv_policy=policy, attn_backend=chosen).cuda()
            with torch.no_grad():
                results.append(logits_on_real(model, ids, mask))
        torch.testing.assert_close(results[1], results[0], atol=2e-4, rtol=2e-4)


def test_with_execution_switches_mode_and_resets_the_estimator():
    trained = RouterConfig(mode="mask", gate_grad="dense", kv_policy="routed")
    served = trained.with_execution("capacity", 0.75)
    assert (served.mode, served.capacity, served.gate_grad, served.kv_policy) == ("capacity", 0.75, "probe",
                                                                                  "routed")
    assert trained.with_execution().gate_grad == "dense"
    assert trained.with_execution("expert_choice").gate_grad == "executed"
    # one capacity given to a served copy replaces per-kind and per-layer plans
    planned = RouterConfig(capacity_attn=0.6, layer_capacity={"attn": [0.5, 1.0], "mlp": [1.0, 1.0]})
    assert planned.capacity_for(0, 0) == 0.5 and planned.capacity_for(1, 1) == 1.0
    flat = planned.with_execution("capacity", 0.9)
    assert (flat.layer_capacity, flat.capacity_attn, flat.capacity_for(0, 0)) == (None, None, 0.9)
    assert planned.with_execution("capacity").layer_capacity == planned.layer_capacity


def test_per_kind_capacity_sets_each_kinds_slots():
    cfg = RouterConfig(capacity=0.8, capacity_attn=0.5)
    assert (cfg.capacity_for(0, 3), cfg.capacity_for(1, 3)) == (0.5, 0.8)
    assert cfg.mean_capacity(4) == (0.5, 0.8)


PLANS = {
    "per_kind": dict(capacity_attn=0.8, capacity_mlp=1.0),
    "per_layer": dict(layer_capacity={"attn": [0.85, 1.0, 0.8], "mlp": [1.0, 0.8, 0.9]}),
}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("padding", ["none", "left"])
def test_per_kind_and_per_layer_capacity_equal_mask_without_overflow(plan, policy, padding):
    """Invariant 1 with capacities per kind and per layer: forward and router gradients equal mask (executed
    estimator) when nothing overflows, and each sublayer really ran its own number of slots."""
    ids, mask = batch(seed=3, padding=padding)
    with torch.no_grad():
        expected = logits_on_real(build("llama_gqa", mode="mask", kv_policy=policy, skip_shift=1.0), ids, mask)
        routed = build("llama_gqa", mode="capacity", kv_policy=policy, skip_shift=1.0, inference_slots="static",
                       **PLANS[plan])
        got = logits_on_real(routed, ids, mask)
    layers = routing_stats(routed)["layers"]
    assert all(layer[k]["overflow"] == 0 for layer in layers for k in ("attn", "mlp")), "must not overflow"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    cfg = routing_context(routed).cfg
    assert len({cfg.capacity_for(k, i) for k in (0, 1) for i in range(3)}) > 1, "slots must differ by sublayer"
    _, grads_mask = train_step_grads(build("llama_gqa", mode="mask", kv_policy=policy, gate_grad="executed",
                                           skip_shift=1.0), ids, mask)
    _, grads_cap = train_step_grads(build("llama_gqa", mode="capacity", kv_policy=policy, gate_grad="executed",
                                          skip_shift=1.0, **PLANS[plan]), ids, mask)
    for name in grads_mask:
        torch.testing.assert_close(grads_cap[name], grads_mask[name], atol=1e-5, rtol=1e-4)


def test_per_layer_capacity_runs_that_many_slots(monkeypatch):
    """k = ceil(capacity * S) per (layer, kind): count the rows each sublayer's MLP / q_proj really sees."""
    plan = {"attn": [1.0, 0.5, 0.25], "mlp": [0.25, 1.0, 0.75]}
    model = build("llama_gqa", mode="capacity", layer_capacity=plan, inference_slots="static")
    ids, mask = batch(seed=1, seq_len=16)
    rows = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: rows.__setitem__(("attn", i), a[0].shape[1]))
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: rows.__setitem__(("mlp", i), a[0].shape[1]))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert rows == {(kind, i): math.ceil(plan[kind][i] * 16) for kind in plan for i in range(3)}


def test_layer_capacity_for_another_layer_count_is_refused():
    with pytest.raises(SkipGPTError, match="layer_capacity has 4 layers, the model 3"):
        build("llama_gqa", mode="capacity", layer_capacity={"attn": [1.0] * 4, "mlp": [1.0] * 4})


def test_probe_estimator_is_unbiased_for_the_dense_gradient():
    """gate_grad=probe at capacity < 1 samples skipped tokens into the free slots with weight skipped/sampled.
    With deterministic gates (the same decisions every step) only the probe draw changes with the noise step:
    its forward equals the executed estimator's, and its router gradient averaged over draws converges to mask
    mode's dense gradient (the executed estimator's does not)."""
    ids, mask = batch(seed=5, padding="none", seq_len=24)
    kwargs = dict(kv_policy="all", skip_shift=1.5)

    def grads(model, step):
        ctx = routing_context(model)
        ctx.noisy, ctx.noise_step = False, step
        return train_step_grads(model, ids, mask)

    loss_dense, dense = grads(build("llama_gqa", mode="mask", gate_grad="dense", **kwargs), 0)
    loss_exec, executed = grads(build("llama_gqa", mode="mask", gate_grad="executed", **kwargs), 0)
    probe_model = build("llama_gqa", mode="capacity", capacity=0.75, gate_grad="probe", **kwargs)
    draws = 300
    mean = {name: torch.zeros_like(g) for name, g in dense.items()}
    for step in range(draws):
        for param in probe_model.parameters():
            param.grad = None
        loss_probe, g = grads(probe_model, step)
        torch.testing.assert_close(loss_probe, loss_dense, atol=1e-6, rtol=1e-6)  # probes add exactly 0
        for name in mean:
            mean[name] += g[name] / draws
    stats = routing_stats(probe_model)["layers"]
    assert all(layer[k]["overflow"] == 0 for layer in stats for k in ("attn", "mlp")), "must not overflow"
    assert 0.2 < routing_stats(probe_model)["sparsity"] < 0.65, "tokens must skip and probes be sampled"
    flat = {key: torch.cat([g[name].flatten() for name in sorted(dense)]) for key, g in
            (("dense", dense), ("probe", mean), ("executed", executed))}
    bias_probe = float((flat["probe"] - flat["dense"]).norm() / flat["dense"].norm())
    bias_exec = float((flat["executed"] - flat["dense"]).norm() / flat["dense"].norm())
    assert bias_probe < 0.1, bias_probe
    assert bias_exec > 3 * bias_probe, (bias_exec, bias_probe)


# ---- KV cache append buffers -------------------------------------------------------------------------------------

def test_routed_cache_appends_into_buffers_equal_to_concatenation():
    """Inference appends write into preallocated buffers (regrown when full); the stored keys/values must always
    equal plain concatenation, also after reorder_cache (beam search) and with autograd recording (cat path)."""
    from skipgpt_dist.routing.cache import KV_BUFFER_MIN_HEADROOM, RoutedCacheLayer

    gen = torch.Generator().manual_seed(0)
    layer, ref_k, ref_v = RoutedCacheLayer(), [], []

    def append(n):
        k, v = torch.randn(2, 3, n, 4, generator=gen), torch.randn(2, 3, n, 4, generator=gen)
        pos = (layer.seen + torch.arange(n)).expand(2, n)
        layer.append(k, v, pos, torch.ones(2, n, dtype=torch.bool), new_tokens=n, all_kept=True)
        ref_k.append(k)
        ref_v.append(v)

    with torch.no_grad():
        append(5)  # prefill: stored as given
        buffers_seen = set()
        for _ in range(2 * KV_BUFFER_MIN_HEADROOM + 10):  # enough single-token appends to regrow
            append(1)
            buffers_seen.add(layer._buffers[0].data_ptr())
            assert torch.equal(layer.keys, torch.cat(ref_k, dim=2)) and torch.equal(layer.values, torch.cat(ref_v, 2))
        assert len(buffers_seen) >= 2, "the buffers must have been regrown at least once"
        assert layer.reserved_bytes() > layer.stored_bytes() == 2 * layer.keys.numel() * 4
        beams = torch.tensor([1, 0])
        layer.reorder_cache(beams)
        ref_k, ref_v = [torch.cat(ref_k, dim=2)[beams]], [torch.cat(ref_v, dim=2)[beams]]
        append(1)
        assert torch.equal(layer.keys, torch.cat(ref_k, dim=2)) and torch.equal(layer.values, torch.cat(ref_v, 2))
    append(1)  # grad enabled: what a recording forward attends (and autograd may save) is a fresh tensor
    saved, before, version = layer.keys, layer.keys.clone(), layer.keys._version
    assert saved.data_ptr() != layer._buffers[0].data_ptr(), "with grad enabled appends concatenate"
    with torch.no_grad():
        append(1)  # must not write into the saved tensor
    assert torch.equal(saved, before) and saved._version == version
    assert torch.equal(layer.keys, torch.cat(ref_k, dim=2))


# ---------------------------------------------------------------- family math the adapters own


def test_moe_aux_loss_counts_only_the_tokens_that_reached_the_experts():
    """Mixtral: with routing disabled the aux loss is Hugging Face's own; capacity (padding slots and skipped tokens
    send nothing that counts) == mask (executed tokens count), while each layer's expert router saw only its slots."""
    ids, mask = batch(seed=3, padding="left")
    torch.manual_seed(0)
    plain = FAMILIES["mixtral"]().float().eval()
    with torch.no_grad():
        want = plain(ids, attention_mask=mask, labels=ids, output_router_logits=True).aux_loss
        attach_routers(plain, RouterConfig(mode="capacity"))
        with routing_disabled(plain):
            assert plain(ids, attention_mask=mask, output_router_logits=True).aux_loss.item() == \
                pytest.approx(want.item(), abs=1e-6)
        aux = {}
        for mode in ("mask", "capacity"):
            model = build("mixtral", mode=mode, capacity=1.0, skip_shift=0.5, inference_slots="dynamic")
            out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
            aux[mode], rows = out.aux_loss, [t.shape[0] for t in out.router_logits]
            assert len(rows) == 3 and (max(rows) < mask.sum() if mode == "capacity" else set(rows) == {ids.numel()})
            lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            torch.testing.assert_close(out.loss, lm + model.config.router_aux_loss_coef * out.aux_loss)
            assert model(ids, attention_mask=mask).aux_loss is None  # not asked: nothing recorded
    torch.testing.assert_close(aux["capacity"], aux["mask"], atol=1e-6, rtol=1e-6)


def lora_targets_of(family, names):
    from types import SimpleNamespace

    from skipgpt_dist.training.model_setup import apply_lora

    torch.manual_seed(0)
    model = FAMILIES[family]().float()
    attach_routers(model, RouterConfig())
    lora = SimpleNamespace(r=2, alpha=4, dropout=0.0, target_modules=names)
    wrapped = apply_lora(model, lora)
    return {name.split(".")[-1] for name, _ in wrapped.named_modules() if hasattr(_, "lora_A")}


def test_default_lora_targets_are_translated_per_family():
    defaults = ("q_proj", "v_proj", "gate_proj")
    assert lora_targets_of("llama_gqa", defaults) == set(defaults)
    assert lora_targets_of("phi3", defaults) == {"qkv_proj", "gate_up_proj"}  # fused projections
    assert lora_targets_of("mixtral", defaults) == {"q_proj", "v_proj"}  # 3-D expert weights: attention only
    with pytest.raises(SkipGPTError, match="match no layer of this mixtral model.*q_proj, v_proj"):
        lora_targets_of("mixtral", ("gate_proj",))
    with pytest.raises(SkipGPTError, match="match no layer of this phi3 model.*qkv_proj, gate_up_proj"):
        lora_targets_of("phi3", ("no_such_proj",))
