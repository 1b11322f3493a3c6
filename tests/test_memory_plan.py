"""tools/plan_memory.py's formulas (skipgpt_dist/memory_plan.py) against memory MEASURED on tiny models on CPU:

- parameters, gradients and AdamW states: exact sums of tensor nbytes after a real forward, backward and step;
- activations: the bytes autograd saves for backward (saved_tensors_hooks, unique storages, parameters excluded),
  stage 1 and 2, mask and capacity modes, fp32 and bf16, LoRA dropout on and off, two shapes (GQA and not);
- the peak of live tensor memory over forward + backward (a TorchDispatchMode that tracks every tensor storage
  an op creates until it is freed), with and without activation checkpointing;
- sharding: the parameter elements each rank holds in the real 2-rank ZeRO-3 and FSDP2 runs of tests/test_tools.py.
Each within 15%.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

from skipgpt_dist.memory_plan import (ModelShape, Setup, activation_bytes, format_plan, logits_bytes,  # noqa: E402
                                      plan_memory)

TOLERANCE = 0.15
BATCH, SEQ = 3, 48
SHAPES = {  # (hidden, layers, heads, kv_heads, intermediate, vocab, tied)
    "gqa": (64, 4, 4, 2, 128, 512, True),
    "mha": (96, 3, 6, 6, 160, 300, False),
}


def shape_of(name: str) -> ModelShape:
    h, L, nh, nkv, inter, vocab, tied = SHAPES[name]
    return ModelShape(name=name, vocab=vocab, hidden=h, layers=L, heads=nh, kv_heads=nkv, intermediate=inter,
                      tied=tied)


def build(name: str, stage: int, mode: str, dtype: torch.dtype, dropout: float = 0.0, checkpointing=False):
    """The model train.py trains, at tiny size: routers attached, base frozen, LoRA in stage 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from skipgpt_dist import RouterConfig, attach_routers
    from skipgpt_dist.training.backends import enable_activation_checkpointing
    from skipgpt_dist.training.model_setup import apply_lora

    h, L, nh, nkv, inter, vocab, tied = SHAPES[name]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=L, num_attention_heads=nh,
                         num_key_value_heads=nkv, intermediate_size=inter, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(dtype)
    attach_routers(model, RouterConfig(mode=mode, capacity=1.0))
    for pname, param in model.named_parameters():
        param.requires_grad_(stage == 1 and "skipgpt_" in pname)
    if stage == 2:
        lora = types.SimpleNamespace(r=8, alpha=16, dropout=dropout, target_modules=["q_proj", "v_proj", "gate_proj"])
        model = apply_lora(model, lora)
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def setup_for(stage: int, mode: str, dtype: torch.dtype, dropout: float = 0.0, checkpointing=False) -> Setup:
    return Setup(nodes=1, gpus_per_node=1, backend="none", seq_len=SEQ, micro_batch=BATCH, stage=stage, lora_r=8,
                 lora_targets=["q_proj", "v_proj", "gate_proj"], lora_dropout=dropout, mode=mode, capacity=1.0,
                 dtype="fp32" if dtype == torch.float32 else "bf16", attn_impl="sdpa",
                 activation_checkpointing=checkpointing)


def loss_of(model, stage: int) -> torch.Tensor:
    from skipgpt_dist.training.losses import global_sparsity_loss, lm_loss

    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    loss = lm_loss(logits, ids, mask)
    if stage == 1:
        loss = loss + global_sparsity_loss(model)[0]
    return loss, logits


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def close(planned: float, measured: float) -> bool:
    return abs(planned - measured) <= TOLERANCE * measured


# ---------------------------------------------------------------- parameters, gradients, optimiser


@pytest.mark.parametrize("stage", [1, 2])
def test_parameters_gradients_optimizer_match_measured(stage):
    model = build("gqa", stage, "capacity", torch.float32)
    params = storages(model.parameters())
    loss, _ = loss_of(model, stage)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    measured = {"parameters": sum(params.values()),
                "gradients": sum(p.grad.nbytes for p in trainable),
                "optimizer states": sum(t.nbytes for state in optimizer.state.values() for t in state.values()
                                        if torch.is_tensor(t))}
    plan = plan_memory(shape_of("gqa"), setup_for(stage, "capacity", torch.float32))
    assert plan.params["trainable"] == sum(p.numel() for p in trainable)
    assert plan.params["total"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for key, value in measured.items():
        assert close(plan.rows[key], value), (key, plan.rows[key], value)


# ---------------------------------------------------------------- activations: saved for backward


CASES = [  # (shape, stage, mode, dtype, lora dropout)
    ("gqa", 1, "capacity", torch.float32, 0.0),
    ("gqa", 1, "mask", torch.bfloat16, 0.0),
    ("mha", 1, "mask", torch.float32, 0.0),
    ("gqa", 2, "capacity", torch.float32, 0.1),
    ("mha", 2, "capacity", torch.bfloat16, 0.0),
    ("mha", 2, "mask", torch.float32, 0.1),
]


@pytest.mark.parametrize("name,stage,mode,dtype,dropout", CASES,
                         ids=[f"{c[0]}-s{c[1]}-{c[2]}-{str(c[3])[6:]}-drop{c[4]}" for c in CASES])
def test_activations_match_saved_tensors(name, stage, mode, dtype, dropout):
    model = build(name, stage, mode, dtype, dropout)
    params = storages(model.parameters())
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_of(model, stage)
    loss.backward()
    planned = activation_bytes(shape_of(name), setup_for(stage, mode, dtype, dropout))["saved"]
    measured = sum(saved.values())
    print(f"{name} stage {stage} {mode} {dtype} dropout {dropout}: planned {planned:.0f} B, measured {measured} B "
          f"({100 * (planned / measured - 1):+.1f}%)")
    assert close(planned, measured)


# ---------------------------------------------------------------- peak live memory, with and without checkpointing


class LiveTensors(TorchDispatchMode):
    """Tracks the storage of every tensor an op creates until it is freed; records the peak of the live bytes."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.refs, self.peak = exclude, {}, 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                old = self.refs.get(st.data_ptr())
                if old is None or old[0].expired():  # a freed storage's address can be reused
                    self.refs[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        self.peak = max(self.peak, self.live())
        return out

    def live(self) -> int:
        for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
            del self.refs[key]
        return sum(n for k, (_, n) in self.refs.items() if k not in self.exclude)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("stage", [1, 2])
def test_peak_activation_memory(stage, checkpointing):
    """Peak of live non-parameter tensors over forward + backward == saved + logits/loss + AC recompute (+ the
    trainable parameters' gradients)."""
    model = build("gqa", stage, "capacity", torch.float32, checkpointing=checkpointing)
    tracker = LiveTensors(set(storages(model.parameters())))
    with tracker:
        loss, logits = loss_of(model, stage)
        after_forward = tracker.live() - logits.untyped_storage().nbytes()
        loss.backward()  # the logits stay referenced during backward, as in the training loop
    shape, setup = shape_of("gqa"), setup_for(stage, "capacity", torch.float32, checkpointing=checkpointing)
    acts = activation_bytes(shape, setup)
    plan = plan_memory(shape, setup)
    planned_peak = acts["saved"] + acts["recompute"] + logits_bytes(shape, setup) + plan.rows["gradients"]
    print(f"stage {stage} checkpointing {checkpointing}: after forward planned {acts['saved']:.0f} measured "
          f"{after_forward}; peak planned {planned_peak:.0f} measured {tracker.peak}")
    assert close(acts["saved"], after_forward)
    assert close(planned_peak, tracker.peak)


# ---------------------------------------------------------------- sharding: per-rank parameter elements of real runs


@pytest.mark.parametrize("kind", ["zero3", "fsdp2"])
def test_sharding_matches_two_rank_runs(kind, tmp_path_factory, tiny_model_dir):
    """tests/test_tools.py's 2-rank stage-2 runs print what each rank holds; the planner predicts it. The ZeRO-3
    run partitions every tensor (persistence threshold 0, as the planner is told)."""
    import test_tools

    run = test_tools.training_run(kind, tmp_path_factory.mktemp("plan_runs"), tiny_model_dir)
    test_tools.checkpoint_or_xfail(run, kind)
    held = run.held()
    assert sorted(held) == [0, 1], run.output[-2000:]
    setup = Setup(nodes=1, gpus_per_node=2, backend="deepspeed" if kind == "zero3" else "fsdp2", zero_stage=3,
                  stage=2, lora_r=4, lora_targets=["q_proj", "v_proj", "gate_proj"], dtype="fp32",
                  persistence_threshold=0)
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    plan = plan_memory(ModelShape.from_config(config), setup)
    for rank, (elements, total) in held.items():
        assert total == plan.params["total"], (total, plan.params["total"])
        assert close(plan.params["held_per_rank"], elements), (rank, plan.params["held_per_rank"], elements)


# ---------------------------------------------------------------- the CLI


def test_cli_prints_plan_and_errors(capsys):
    import importlib.util

    from dist_helpers import REPO

    spec = importlib.util.spec_from_file_location("tool_plan_memory", REPO / "tools" / "plan_memory.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["llama2-13b", "--nodes", "2", "--stage", "2"])
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer states", "activations", "all-gather buffers", "total", "fits"):
        assert word in out, word
    tool.main(["llama3-70b", "--nodes", "8", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["total"] > 70e9 and data["fits"] in (True, False)
    with pytest.raises(SystemExit) as exc:
        tool.main(["no-such-model"])
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "preset" in line and "\n" not in line


def test_plan_scales_as_documented():
    """Sharding divides parameters by the rank count; checkpointing shrinks activations; stage 2 adds LoRA."""
    model = ModelShape.load("llama2-13b")
    one = plan_memory(model, Setup(nodes=1, backend="fsdp2", stage=1))
    two = plan_memory(model, Setup(nodes=2, backend="fsdp2", stage=1))
    assert abs(one.rows["parameters"] / two.rows["parameters"] - 2) < 1e-6
    no_ac = plan_memory(model, Setup(nodes=2, activation_checkpointing=False))
    assert no_ac.rows["activations"] > 5 * two.rows["activations"]
    stage2 = plan_memory(model, Setup(nodes=2, stage=2))
    assert stage2.params["lora"] == 40 * 16 * ((5120 + 5120) * 2 + 5120 + 13824)
    zero2 = plan_memory(model, Setup(nodes=2, zero_stage=2))
    assert zero2.rows["parameters"] == model_bytes(zero2)
    assert "fits" in format_plan(two)


def model_bytes(plan) -> float:
    return plan.params["total"] * plan.setup.w
