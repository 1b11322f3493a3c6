"""The GPU code paths, checked on CPU (issue #15): no GPU has run this code, so these tests pin the GPU failure modes
by construction.

1. Collectives on the right device. NCCL moves only CUDA tensors: a CPU tensor raises "No backend type associated
   with device type cpu" (facts.md: a "cuda:gloo" group on CPU reproduces it). Every collective of the loop, the
   evaluation and the losses goes through distributed.all_reduce_sum, which puts its tensor on comm_device(); the
   engines start GPU groups as "cpu:gloo,cuda:nccl".
2. Routers and their optimiser state are fp32 whatever the base dtype: bf16 cannot hold 1.0 + 2e-3.
3. LocalEngine moves the model to the GPU when there is one.
"""
from __future__ import annotations

import inspect
import json
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import REPO, train, write_text_files, zero3_all_sharded  # noqa: E402

from skipgpt_dist.config import load_config  # noqa: E402
from skipgpt_dist.errors import SkipGPTError  # noqa: E402
from skipgpt_dist.training import distributed as D  # noqa: E402

LR = 2e-3
BF16_ULP_ABOVE_ONE = 2.0 ** -7  # bf16 values next to 1.0 are 0.99609 and 1.0078: a 2e-3 step cannot land between


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> dict:
    from skipgpt_dist.assets import shakespeare_files

    root = tmp_path_factory.mktemp("gpu_path_text")
    return {"train": write_text_files(root / "train", shakespeare_files("train"), chars=6000, count=2),
            "eval": write_text_files(root / "eval", shakespeare_files("eval"), chars=2000, count=1)}


def overrides(tiny_model_dir, text_files, run_dir, *extra) -> list[str]:
    """A tiny stage-1 run whose first step moves every router bias by ~LR: warm-up 0, no weight decay, bias
    [1.0, -1.0] (init_margin 2)."""
    return [f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "logging.progress=false", "data.seq_len=32",
            "data.eval_sequences=2", f"data.train_files={json.dumps(text_files['train'])}",
            f"data.eval_files={json.dumps(text_files['eval'])}", "optim.micro_batch_size=2", "optim.max_steps=1",
            "optim.warmup_steps=0", "optim.weight_decay=0", f"optim.lr={LR}", "routers.init_margin=2.0",
            "checkpoint.every_steps=0", "eval.at_end=false", "seed=3", *extra]


@pytest.fixture
def one_rank_group():
    """Start a 1-rank default group with the given backend string; destroyed afterwards."""
    def start(backend: str):
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def keep_signal_handlers():
    """StopSignal installs SIGUSR1 / SIGTERM handlers: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# ---------------------------------------------------------------- 1. collectives: backend string and device


def test_backend_string_adds_gloo_for_cpu_tensors_beside_nccl(monkeypatch):
    assert D.backend_string(cuda=True) == "cpu:gloo,cuda:nccl"
    assert D.backend_string(cuda=False) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.backend_string() == "cpu:gloo,cuda:nccl"


@pytest.mark.parametrize("config, cuda, expected", [
    ("cpu:gloo,cuda:nccl", True, "cuda:0"),  # the GPU group: NCCL moves the collectives, tensors go to the GPU
    ("cuda:nccl", True, "cuda:0"),           # NCCL alone (a group someone else started)
    ("cpu:gloo,cuda:gloo", False, "cpu"),    # plain "gloo" on a CPU machine
    ("gloo", False, "cpu"),
    ("cuda:gloo", False, None),               # no backend for CPU tensors and no GPU: a one-line error
])
def test_comm_device_follows_the_groups_backends(monkeypatch, config, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    backends = D.group_backends(config)
    if expected is None:
        with pytest.raises(SkipGPTError, match="no backend for CPU tensors"):
            D.comm_device(backends)
    else:
        assert D.comm_device(backends) == torch.device(expected)


def test_engines_start_gpu_groups_with_gloo_beside_nccl(monkeypatch, tmp_path):
    """Both engines' setup() on a (pretended) GPU machine start the default group with D.backend_string()."""
    import deepspeed
    from torch.distributed import device_mesh

    from skipgpt_dist.training import deepspeed_engine, fsdp2_engine

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.append(("fsdp2", backend)))
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda *a, **kw: None)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 1)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend, **kw: seen.append(("ds", dist_backend)))
    for key, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WORLD_SIZE")  # fsdp2: the plain-process path (HashStore, no rendezvous)
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"run_dir={tmp_path}", "parallel.backend=fsdp2"])
    fsdp2_engine.setup(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")  # deepspeed: no launcher environment to invent
    monkeypatch.setattr(deepspeed_engine, "_STATE", {})
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"run_dir={tmp_path}", "parallel.backend=deepspeed"])
    deepspeed_engine.setup(cfg)
    assert seen == [("fsdp2", "cpu:gloo,cuda:nccl"), ("ds", "cpu:gloo,cuda:nccl")]


def test_a_cuda_only_group_rejects_cpu_tensors_and_the_loop_says_why(one_rank_group, keep_signal_handlers):
    """The NCCL failure mode on CPU: a group bound to CUDA only. A raw CPU all_reduce fails deep in c10d; the
    loop's collective (StopSignal.agreed, through the helper) refuses with a one-line error naming the fix."""
    from skipgpt_dist.training.loop import StopSignal

    one_rank_group("cuda:gloo")
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones(1))
    fix = r'start it with init_process_group\("gloo"\)'  # on a GPU machine: "cpu:gloo,cuda:nccl"
    with pytest.raises(SkipGPTError, match=r"no backend for CPU tensors and CUDA is unavailable: " + fix):
        StopSignal().agreed()


def test_loop_and_eval_collectives_all_run_on_comm_device(tiny_model_dir, text_files, tmp_path, monkeypatch,
                                                         one_rank_group, keep_signal_handlers):
    """Every collective of a training step (metrics, sparsity loss), of the stop vote and of evaluate's NLL goes
    through D.all_reduce_sum with its tensor on comm_device(); none calls torch.distributed directly."""
    from skipgpt_dist.training import evaluate as evaluate_mod
    from skipgpt_dist.training import loop, losses
    from skipgpt_dist.training.engine import LocalEngine
    from skipgpt_dist.training.model_setup import build_model

    for module in (loop, evaluate_mod, losses):
        assert "torch.distributed" not in inspect.getsource(module), module.__name__
    one_rank_group("gloo")
    calls, real_all_reduce = [], dist.all_reduce

    def recording(tensor, *args, **kwargs):
        calls.append((tensor.device, inspect.stack()[1].function))
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording)
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), overrides(tiny_model_dir, text_files, tmp_path))
    model, tokenizer, _ = build_model(cfg)
    batches, held_out = loop.build_data(cfg, tokenizer)
    engine = LocalEngine(model, cfg)
    metrics = loop.train_step(engine, model, batches.next_step(), cfg, 0, routers_train=True)
    assert loop.StopSignal().agreed() is False
    result = evaluate_mod.evaluate(engine.model, held_out, 2)
    # per micro-batch: the sparsity loss; per step: the metrics; the stop vote; evaluate: routed + dense
    assert len(calls) == cfg.optim.grad_accum_steps + 1 + 1 + 2, calls
    assert {device for device, _ in calls} == {D.comm_device()}
    assert {caller for _, caller in calls} == {"all_reduce_sum"}
    assert torch.isfinite(torch.tensor(metrics["loss"])) and len(metrics["layers"]) == model.config.num_hidden_layers
    assert result["ppl_routed"] > 1 and result["ppl_dense"] > 1


def test_stats_tensor_equals_routing_stats(tiny_model_dir, text_files, tmp_path):
    """The device-side statistics the loop accumulates are routing_stats' figures (public output unchanged)."""
    from skipgpt_dist.routing import routing_stats
    from skipgpt_dist.routing.api import routing_stats_tensor
    from skipgpt_dist.training.model_setup import build_model

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"),
                      overrides(tiny_model_dir, text_files, tmp_path, "routers.init_margin=0.0"))
    model, _, _ = build_model(cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    stats, tensor = routing_stats(model), routing_stats_tensor(model)
    per_layer = [[layer["attn"]["execute"], layer["mlp"]["execute"]] for layer in stats["layers"]]
    assert tensor.dtype == torch.float64
    assert tensor.tolist() == pytest.approx([stats["attn_execute"], stats["mlp_execute"],
                                             *[v for pair in per_layer for v in pair]], abs=1e-12)


# ---------------------------------------------------------------- 3. LocalEngine on the local device


def test_local_engine_moves_the_model_to_the_local_device(monkeypatch, tmp_path):
    """Pretend the local device is not the CPU ("meta" stands in for cuda:N): the model and the optimiser's
    parameters move there. On the CPU nothing moves (the same parameter objects and storage)."""
    from skipgpt_dist.training.engine import LocalEngine

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"run_dir={tmp_path}"])
    model = torch.nn.Linear(4, 2)
    storage = model.weight.data_ptr()
    engine = LocalEngine(model, cfg)
    assert engine.model is model and model.weight.data_ptr() == storage
    monkeypatch.setattr(D, "local_device", lambda: torch.device("meta"))
    engine = LocalEngine(torch.nn.Linear(4, 2), cfg)
    assert {p.device.type for p in engine.model.parameters()} == {"meta"}
    assert {p.device.type for p in engine.optimizer.param_groups[0]["params"]} == {"meta"}


# ---------------------------------------------------------------- 2. fp32 routers on a bf16 base


def assert_fp32_step_from_one(bias: torch.Tensor, steps: int = 1):
    """The execute bias started at 1.0; `steps` AdamW steps at LR moved it by about LR each (Adam's first step is
    lr * g / |g|), a move bf16 cannot represent (its neighbours of 1.0 are 0.99609 and 1.0078)."""
    assert bias.dtype == torch.float32, bias.dtype
    moved = abs(float(bias[0]) - 1.0)
    assert 0.5 * LR < moved <= steps * LR * 1.01, float(bias[0])
    assert moved < BF16_ULP_ABOVE_ONE / 2


def test_routers_are_fp32_on_a_bf16_base_and_a_small_step_moves_them(tiny_model_dir, text_files, tmp_path):
    """One process (parallel.backend=none), model.dtype=bfloat16: routers and their Adam state are fp32, the base
    stays bf16, one step at lr 2e-3 moves a bias of 1.0 by ~2e-3, and routers.safetensors holds fp32. Stage 2
    (LoRA) on that base keeps the routers fp32 and trains fp32 adapters."""
    from skipgpt_dist.routing.api import router_parameters
    from skipgpt_dist.training.engine import LocalEngine
    from skipgpt_dist.training.loop import run
    from skipgpt_dist.training.model_setup import build_model

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"),
                      overrides(tiny_model_dir, text_files, tmp_path / "s1", "model.dtype=bfloat16"))
    model, _, _ = build_model(cfg)
    assert {p.dtype for _, p in router_parameters(model)} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "skipgpt_" not in n} == {torch.bfloat16}
    engine = LocalEngine(model, cfg)
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    engine.backward(logits.float().mean())
    engine.step()
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in engine.optimizer.state.values())

    result = run(cfg)
    routers = load_file(str(result.checkpoint / "routers.safetensors"))
    assert {t.dtype for t in routers.values()} == {torch.float32}
    assert_fp32_step_from_one(routers["layers.0.attn_router.net.bias"])

    stage2 = load_config(str(REPO / "configs" / "tiny_stage2.yaml"),
                         overrides(tiny_model_dir, text_files, tmp_path / "s2", "model.dtype=bfloat16",
                                   f"stage.init_from={tmp_path / 's1'}"))
    result = run(stage2)
    adapter = load_file(str(result.checkpoint / "adapter" / "adapter_model.safetensors"))
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
    after = load_file(str(result.checkpoint / "routers.safetensors"))
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert torch.equal(after["layers.0.attn_router.net.bias"], routers["layers.0.attn_router.net.bias"])  # frozen


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp2_bf16_compute", "zero3", "zero3_bf16"])
def test_routers_train_in_fp32_on_a_bf16_base_on_two_ranks(backend, tiny_model_dir, text_files, tmp_path):
    """2-rank FSDP2 and ZeRO-3 (every parameter partitioned) on a bf16 base, with and without bf16 compute:
    one step at lr 2e-3 moves a router bias of 1.0 by ~2e-3 in fp32 (routers.safetensors are the fp32 masters)."""
    extra = ["model.dtype=bfloat16", "optim.micro_batch_size=1"]
    ds_config = None
    if backend.startswith("fsdp2"):
        extra.append("parallel.backend=fsdp2")
    else:
        ds_config = zero3_all_sharded(tmp_path)
    if backend.endswith("bf16_compute") or backend.endswith("_bf16"):
        extra.append("parallel.mixed_precision=bf16")
    run = train(tmp_path / "run", overrides(tiny_model_dir, text_files, tmp_path / "run", *extra),
                config=REPO / "configs" / "tiny.yaml", ds_config=ds_config, timeout=240)
    assert run.returncode == 0, run.output[-4000:]
    rows = run.metrics()
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["loss"])), run.output[-2000:]
    folder = sorted((run.run_dir / "checkpoints").glob("step_*"))[-1]
    routers = load_file(str(folder / "routers.safetensors"))
    assert {t.dtype for t in routers.values()} == {torch.float32}
    assert_fp32_step_from_one(routers["layers.0.attn_router.net.bias"])
