"""Routed blocks that never stall a GPU (issue #15 items 3 and 7), and their compiled copy (parallel.compile).

There is no GPU here, so the tests count, inside routed blocks only, the ops that would stall one:
aten._local_scalar_dense (item(), tolist(), bool()/int() of a tensor: a device-to-host read) and tensors made from
host data (aten.lift_fresh: torch.tensor(...), which on a GPU is a host-to-device copy). CPU eager may read values
on the host where that is free (context.host_reads_free); torch.compiler.is_compiling() patched to True puts every
routed path (and attention.py's) on the branch a GPU or a compiled graph takes, so that branch is what is counted.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from routing_models import COMMON, batch, build, scramble_routers
from skipgpt_dist import RouterConfig, attach_routers, routing_context
from skipgpt_dist.routing import routed_layers
from skipgpt_dist.routing.gates import hashed_uniform
from skipgpt_dist.training.compile import compile_layer

aten = torch.ops.aten
HOST_READS = (aten._local_scalar_dense.default,)
HOST_TENSORS = (aten.lift_fresh.default, aten.lift_fresh_copy.default)


class BlockOpCounter(TorchDispatchMode):
    """Counts host reads and host-made tensors while a routed block runs (forward hooks switch it on and off)."""

    def __init__(self, model):
        super().__init__()
        self.reads = self.host_tensors = 0
        self.active = False
        self.handles = []
        for layer in routed_layers(model):
            self.handles.append(layer.register_forward_pre_hook(lambda *_: setattr(self, "active", True)))
            self.handles.append(layer.register_forward_hook(lambda *_: setattr(self, "active", False)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.reads += func in HOST_READS
            self.host_tensors += func in HOST_TENSORS
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)


@pytest.fixture
def device_branch(monkeypatch):
    """Run the code as on a GPU / under torch.compile: no host reads are free."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def llama(layers: int, seed: int = 0, skip_shift: float = 0.5, **router_kwargs):
    torch.manual_seed(seed)
    config = LlamaConfig(num_attention_heads=6, num_key_value_heads=2, **{**COMMON, "num_hidden_layers": layers})
    model = LlamaForCausalLM(config).float().eval()
    attach_routers(model, RouterConfig(**router_kwargs))
    scramble_routers(model, seed, skip_shift)
    return model


def train_forward_counts(model, ids, mask, step: int) -> tuple[int, int]:
    model.train()
    ctx = routing_context(model)
    ctx.noise_seed, ctx.noise_step, ctx.sample_ids = 7, step, torch.tensor([11, 12, 13])
    with BlockOpCounter(model) as counter:
        logits = model(ids, attention_mask=mask, use_cache=False).logits
    logits.sum().backward()
    return counter.reads, counter.host_tensors


# ---- A: the training forward -----------------------------------------------------------------------------------

def _frozen_hashed_uniform(seed, step, sample_ids, layer, kind, positions):
    """The noise hash as it was before issue #15 (base built as a CPU tensor): resume and distributed runs depend
    on the new code giving these exact values."""
    mask64 = (1 << 64) - 1

    def signed(x):
        x &= mask64
        return x - (1 << 64) if x >= (1 << 63) else x

    m1, m2, golden = signed(0xBF58476D1CE4E5B9), signed(0x94D049BB133111EB), signed(0x9E3779B97F4A7C15)

    def shr(x, n):
        return (x >> n) & ((1 << (64 - n)) - 1)

    def splitmix(x):
        x = x ^ shr(x, 30)
        x = x * m1
        x = x ^ shr(x, 27)
        x = x * m2
        return x ^ shr(x, 31)

    base = torch.tensor(signed(seed * 0x100000001B3 + step), dtype=torch.int64)
    for value in (layer, kind):
        base = splitmix(base ^ signed((value + 1) * golden))
    x = splitmix(base ^ (sample_ids.to(torch.int64)[:, None] * golden))
    x = splitmix(x ^ (positions.to(torch.int64) * m1))
    x = splitmix(x[..., None] ^ (torch.arange(1, 3, dtype=torch.int64) * m2))
    return ((shr(x, 11).to(torch.float64) + 0.5) / float(1 << 53)).to(torch.float32)


def test_noise_hash_equals_the_frozen_original():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        seed, step = (int(v) for v in torch.randint(0, 2 ** 62, (2,), generator=gen))
        if trial % 4 == 0:
            seed, step = trial, trial * 3  # small values, as in real runs
        layer, kind = int(torch.randint(0, 80, (), generator=gen)), trial % 2
        ids = torch.randint(0, 2 ** 40, (3,), generator=gen)
        pos = torch.randint(0, 1 << 20, (3, 17), generator=gen)
        assert torch.equal(hashed_uniform(seed, step, ids, layer, kind, pos),
                           _frozen_hashed_uniform(seed, step, ids, layer, kind, pos)), (seed, step, layer, kind)


@pytest.mark.parametrize("mode", ["capacity", "mask"])
def test_training_forward_makes_no_host_tensors_per_layer(mode):
    """Noise ids and hash bases reach the device once per forward (one packed copy), not per layer and kind."""
    ids, mask = batch(seed=3, padding="left")
    made = {}
    for layers in (2, 4):
        model = llama(layers, mode=mode, capacity=0.8)
        train_forward_counts(model, ids, mask, step=0)  # warm-up: routers cache their eps constant once
        made[layers] = train_forward_counts(model, ids, mask, step=1)[1]
    assert made[2] == made[4] <= 1, made


@pytest.mark.parametrize("mode", ["capacity", "mask"])
def test_training_forward_reads_nothing_on_the_host(device_branch, mode):
    ids, mask = batch(seed=3, padding="left")
    for layers in (2, 4):
        model = llama(layers, mode=mode, capacity=0.8)
        train_forward_counts(model, ids, mask, step=0)
        assert train_forward_counts(model, ids, mask, step=1)[0] == 0, layers


def test_noise_inputs_are_made_once_per_forward():
    model = build("llama_gqa", mode="capacity", capacity=0.8)
    ctx = routing_context(model)
    ctx.sample_ids = torch.tensor([4, 5, 6])
    ids, bases = ctx.noise_inputs(3, torch.device("cpu"))
    assert ctx.noise_inputs(3, torch.device("cpu"))[0] is ids and bases.shape == (3, 2)
    assert ids.tolist() == [4, 5, 6]


# ---- B: static-slot inference -----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["all", "routed"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_static_inference_reads_nothing_on_the_host(device_branch, policy, padding):
    """Eval forward, prefill and every decode step: no host read in any routed block, for 2 and 4 layers."""
    ids, mask = batch(seed=4, padding=padding)
    for layers in (2, 4):
        model = llama(layers, mode="capacity", capacity=0.75, kv_policy=policy, inference_slots="static")
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=False)  # warm-up
            with BlockOpCounter(model) as counter:
                model(ids, attention_mask=mask, use_cache=False)
            assert (counter.reads, counter.host_tensors) == (0, 0), ("forward", layers)
            cache = DynamicCache()
            with BlockOpCounter(model) as counter:
                model(ids[:, :12], attention_mask=mask[:, :12], past_key_values=cache, use_cache=True)
                for t in range(12, ids.shape[1]):
                    model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            assert (counter.reads, counter.host_tensors) == (0, 0), ("decode", layers)


@pytest.mark.parametrize("policy", ["all", "routed"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_static_slots_equal_mask_without_overflow(device_branch, policy, padding):
    """capacity 1.0 (nothing can overflow): the sync-free static path, full forward and cached decode, == mask."""
    ids, mask = batch(seed=5, padding=padding)
    real = mask.bool()
    reference = build("llama_gqa", mode="mask", kv_policy=policy, skip_shift=0.5)
    static = build("llama_gqa", mode="capacity", capacity=1.0, kv_policy=policy, skip_shift=0.5,
                   inference_slots="static")
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        torch.testing.assert_close(static(ids, attention_mask=mask).logits[real], expected[real], atol=1e-5,
                                   rtol=1e-5)
        cache = DynamicCache()
        steps = [static(ids[:, :10], attention_mask=mask[:, :10], past_key_values=cache, use_cache=True).logits]
        for t in range(10, ids.shape[1]):
            steps.append(static(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                                use_cache=True).logits)
        torch.testing.assert_close(torch.cat(steps, dim=1)[real], expected[real], atol=1e-5, rtol=1e-5)


# ---- C: torch.compile of the routed block -----------------------------------------------------------------------

def _graph_counter():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


@pytest.mark.parametrize("policy", ["all", "routed"])
def test_compiled_block_is_one_graph_and_equals_eager(policy):
    """fullgraph=True (a graph break raises) in train mode with Gumbel noise and capacity slots, and in eval mode
    with static slots; compiled == eager (forward and router gradients); steps and temperatures do not recompile
    beyond the float becoming symbolic once; one graph serves every layer."""
    torch._dynamo.reset()  # (dynamo's cache of routed_compute is per process: count this test's graphs only)
    ids, mask = batch(seed=6, padding="left")
    eager = build("llama_gqa", mode="capacity", capacity=0.8, kv_policy=policy, inference_slots="static")
    compiled = build("llama_gqa", mode="capacity", capacity=0.8, kv_policy=policy, inference_slots="static")
    graphs, backend = _graph_counter()
    for layer in routed_layers(compiled):
        compile_layer(layer, fullgraph=True, backend=backend)
    per_step = []
    for step in range(3):
        results = []
        for model in (eager, compiled):
            ctx = routing_context(model)
            ctx.noise_step, ctx.temperature, ctx.sample_ids = step, 5.0 - step, torch.tensor([3, 1, 2])
            model.train()
            model.zero_grad(set_to_none=True)
            for name, param in model.named_parameters():
                param.requires_grad_("skipgpt_" in name)
            logits = model(ids, attention_mask=mask, use_cache=False).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
            grads = [p.grad for n, p in model.named_parameters() if p.grad is not None]
            results.append((logits.detach(), grads))
        torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
        for got, want in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        per_step.append(len(graphs))
    # Two graphs for 3 layers (layer 0's h needs no gradient, the others' do), none more as step and temperature change
    assert per_step == [2, 2, 2], per_step
    with torch.no_grad():
        want = eager.eval()(ids, attention_mask=mask, use_cache=False).logits
        got = compiled.eval()(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 3, len(graphs)  # + eval, no grad: one for every layer


def test_compiled_block_with_inductor_equals_eager():
    torch._dynamo.reset()
    ids, mask = batch(seed=7)
    eager = build("llama_gqa", mode="capacity", capacity=0.8, inference_slots="static")
    compiled = build("llama_gqa", mode="capacity", capacity=0.8, inference_slots="static")
    layer = routed_layers(compiled)[1]
    compile_layer(layer, fullgraph=True)  # inductor: C++ on CPU
    for model in (eager, compiled):
        routing_context(model).noise_step = 4
        model.train()
    torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits,
                               atol=1e-5, rtol=1e-5)


# ---- a real GPU: the driver itself refuses synchronising calls --------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ["all", "routed"])
def test_no_cuda_sync_in_routed_blocks(policy):
    ids, mask = (t.cuda() for t in batch(seed=8, padding="left"))
    model = llama(3, mode="capacity", capacity=0.75, kv_policy=policy, inference_slots="static",
                  attn_backend="sdpa").cuda()
    routing_context(model).sample_ids = torch.tensor([1, 2, 3])
    syncs = []
    for layer in routed_layers(model):  # only the blocks: HF's own mask code may sync outside them
        layer.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"))
        layer.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default"))
    try:
        for train in (True, False):
            model.train(train)
            with torch.set_grad_enabled(train):
                model(ids, attention_mask=mask, use_cache=False)
        with torch.no_grad():
            cache = DynamicCache()
            model(ids[:, :10], attention_mask=mask[:, :10], past_key_values=cache, use_cache=True)
            for t in range(10, 14):
                model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
    except RuntimeError as err:
        syncs.append(str(err))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not syncs, syncs
