"""Portable resume (issue #17): a checkpoint written on one back end / world size / ZeRO stage resumes on another
from its `portable/` state (full fp32 trainable tensors + AdamW state + schedule), and the resumed steps equal an
uninterrupted run on the new layout.

Each layout runs once, uninterrupted, for 4 steps with a checkpoint every 2 steps (keep_last 2): that run is the
reference for its layout, and its step-2 checkpoint is the source another layout resumes from
(`checkpoint.resume=<step_2>` into a fresh run folder, so its metrics hold steps 3-4 only). The global batch is the
same everywhere (1 process: micro-batch 4; 2 ranks: 2 per rank; accumulation 2). Cases: ZeRO-3 (2 ranks) -> one
process; one process -> FSDP2 (2 ranks); FSDP2 (2 ranks) -> ZeRO-3 (2 ranks); and stage 2 (LoRA) ZeRO-3 -> one
process. LoRA dropout is 0 (dropout draws from each rank's torch RNG, the one RNG training still uses: the Gumbel
noise is hashed from the global sample id and step, the data order comes from its own seeded generator).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import train, write_text_files, zero3_all_sharded  # noqa: E402

ATOL = 1e-5
PER_RANK = ["optim.micro_batch_size=2"]
ONE_PROCESS = ["optim.micro_batch_size=4"]
STAGE2 = ["stage.stage=2", "stage.lora.r=4", "stage.lora.alpha=8", "stage.lora.dropout=0", "optim.lr=2e-3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("portable")


@pytest.fixture(scope="module")
def common(root, tiny_model_dir) -> list[str]:
    """tests/test_distributed.py's setup, with a checkpoint every 2 of the 4 steps."""
    from skipgpt_dist.assets import shakespeare_files

    train_files = write_text_files(root / "train_text", shakespeare_files("train"))
    return [f"model.path={tiny_model_dir}", "data.seq_len=32", "logging.progress=false",
            "optim.max_steps=4", "optim.warmup_steps=1", "optim.grad_accum_steps=2",
            "checkpoint.every_steps=2", "checkpoint.keep_last=2", "routers.mode=capacity", "routers.capacity=1.0",
            "seed=3", f"data.train_files={json.dumps(train_files)}"]


def layout(name: str, root: Path) -> dict:
    """train() keyword arguments and overrides of a layout."""
    if name == "none":
        return {"launcher": "python", "nproc": 1, "extra": ONE_PROCESS}
    if name == "fsdp2":
        return {"launcher": "torchrun", "nproc": 2, "extra": PER_RANK + ["parallel.backend=fsdp2"]}
    if name == "zero3":
        return {"launcher": "torchrun", "nproc": 2, "extra": PER_RANK, "ds_config": zero3_all_sharded(root)}
    raise ValueError(name)


def run_on(name, run_dir, overrides, root):
    spec = layout(name, root)
    run = train(run_dir, overrides + spec.pop("extra"), **spec)
    assert run.returncode == 0, run.output[-4000:]
    return run


_RUNS: dict = {}


def uninterrupted(name, root, overrides, tag=""):
    """4 steps on layout `name`, checkpoints at steps 2 and 4 (cached per module)."""
    key = (name, tag)
    if key not in _RUNS:
        run = run_on(name, root / f"full_{name}{tag}", overrides, root)
        assert len(run.metrics()) == 4, run.output[-3000:]
        _RUNS[key] = run
    return _RUNS[key]


def step_dir(run, step):
    from skipgpt_dist.checkpoint import step_dir_name

    return run.run_dir / "checkpoints" / step_dir_name(step)


def final(run, name):
    from safetensors.torch import load_file

    return load_file(str(step_dir(run, 4) / name))


def assert_resumed_equals(source, target, resumed, artifact):
    assert "from its portable state" in resumed.output, resumed.output[-3000:]
    assert f"resumed from {step_dir(source, 2)} at step 2" in resumed.output
    assert [r["step"] for r in resumed.metrics()] == [3, 4]
    for key in ("loss", "lm_loss"):
        got, want = resumed.trajectory(key), target.trajectory(key)[2:]
        assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                              atol=ATOL, rtol=0), (key, got, want)
    assert resumed.trajectory("lr") == pytest.approx(target.trajectory("lr")[2:], rel=1e-9)
    a, b = final(resumed, artifact), final(target, artifact)
    assert set(a) == set(b) and a
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=ATOL, rtol=0), (key, (a[key] - b[key]).abs().max())


@pytest.mark.parametrize("source,target", [("zero3", "none"), ("none", "fsdp2"), ("fsdp2", "zero3")])
def test_stage1_resumes_on_another_back_end(root, common, source, target):
    src = uninterrupted(source, root, common)
    ref = uninterrupted(target, root, common)
    portable = step_dir(src, 2) / "portable"
    assert {p.name for p in portable.iterdir()} >= {"params.safetensors", "exp_avg.safetensors",
                                                   "exp_avg_sq.safetensors", "state.json"}
    resumed = run_on(target, root / f"{source}_to_{target}",
                     common + [f"checkpoint.resume={step_dir(src, 2)}"], root)
    assert_resumed_equals(src, ref, resumed, "routers.safetensors")


def test_portable_state_is_the_same_on_every_back_end(root, common):
    """The step-2 portable state of the three layouts: the same names, values within 1e-5, steps and schedule."""
    from safetensors.torch import load_file

    folders = [step_dir(uninterrupted(name, root, common), 2) / "portable" for name in ("none", "fsdp2", "zero3")]
    metas = [json.loads((f / "state.json").read_text()) for f in folders]
    assert [m["backend"] for m in metas] == ["none", "fsdp2", "deepspeed"]
    assert [m["zero_stage"] for m in metas] == [None, None, 3]
    assert {m["global_batch_size"] for m in metas} == {8}
    assert all(set(m["steps"].values()) == {2} for m in metas)
    assert metas[0]["scheduler"]["last_epoch"] == metas[1]["scheduler"]["last_epoch"] == 2
    for file in ("params.safetensors", "exp_avg.safetensors", "exp_avg_sq.safetensors"):
        tensors = [load_file(str(f / file)) for f in folders]
        assert set(tensors[0]) == set(tensors[1]) == set(tensors[2]) and tensors[0]
        assert all(k.startswith("model.layers.") and "skipgpt_" in k for k in tensors[0])
        for other in tensors[1:]:
            for k, v in tensors[0].items():
                assert v.dtype == torch.float32
                assert torch.allclose(v, other[k], atol=ATOL, rtol=1e-4), (file, k)


def test_stage2_lora_resumes_from_zero3_on_one_process(root, common):
    stage1 = uninterrupted("none", root, common)
    stage2 = common + STAGE2 + [f"stage.init_from={step_dir(stage1, 4)}"]
    src = uninterrupted("zero3", root, stage2, tag="_s2")
    ref = uninterrupted("none", root, stage2, tag="_s2")
    names = set(json.loads((step_dir(src, 2) / "portable" / "state.json").read_text())["steps"])
    assert names and all("lora_" in n and not n.startswith("base_model.") for n in names), sorted(names)[:3]
    resumed = run_on("none", root / "s2_zero3_to_none", stage2 + [f"checkpoint.resume={step_dir(src, 2)}"], root)
    assert_resumed_equals(src, ref, resumed, "adapter/adapter_model.safetensors")


def test_portable_names_strip_wrappers():
    from skipgpt_dist.training.portable import portable_name

    want = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    for name in (want, "module." + want, "base_model.model." + want, "module.base_model.model." + want,
                 "base_model.model.model.layers.0._checkpoint_wrapped_module.self_attn._orig_mod.q_proj."
                 "lora_A.default.weight"):
        assert portable_name(name) == want, name


def test_resume_decision(tmp_path):
    """Native format where it loads (same back end; DeepSpeed: same world size and stage), else portable; a
    changed global batch is allowed and said; no portable state across back ends is a one-line error."""
    from types import SimpleNamespace

    from skipgpt_dist.errors import SkipGPTError
    from skipgpt_dist.training.portable import portable_reason

    def cfg(backend, mbs=4):
        return SimpleNamespace(parallel=SimpleNamespace(backend=backend),
                               global_batch_size=lambda world: mbs * 2 * world)

    def ckpt(name, **layout):
        folder = tmp_path / name
        (folder / "portable").mkdir(parents=True)
        (folder / "portable" / "state.json").write_text(json.dumps({"format": 1, **layout}))
        return folder

    z3 = ckpt("z3", backend="deepspeed", world_size=1, zero_stage=3, global_batch_size=8)
    state = {"backend": "deepspeed", "world_size": 1}
    assert portable_reason(z3, state, SimpleNamespace(stage=3), cfg("deepspeed")) is None
    reason = portable_reason(z3, state, SimpleNamespace(stage=2), cfg("deepspeed"))
    assert "deepspeed ZeRO-3 on 1 rank(s)" in reason and "ZeRO-2" in reason and "global batch" not in reason
    reason = portable_reason(z3, state, SimpleNamespace(), cfg("none", mbs=2))
    assert "global batch changes from 8 to 4 rows" in reason and "trajectory will differ" in reason
    fsdp = ckpt("fsdp", backend="fsdp2", world_size=2, zero_stage=None, global_batch_size=8)
    assert portable_reason(fsdp, {"backend": "fsdp2"}, SimpleNamespace(), cfg("fsdp2")) is None  # DCP reshards
    old = tmp_path / "old"
    old.mkdir()
    with pytest.raises(SkipGPTError, match="written by parallel.backend=deepspeed, this run uses none"):
        portable_reason(old, state, SimpleNamespace(), cfg("none"))
