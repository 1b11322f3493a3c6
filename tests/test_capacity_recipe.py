"""The real-skipping training recipe (issue 14): per-layer capacity plan from the warm start, the probe estimator,
and a stage-1 capacity run that stays with its mask-mode twin; the plan travels with the routers."""
import json
import math

import pytest
from safetensors import safe_open

from skipgpt_dist.config import load_config
from skipgpt_dist.training.loop import run
from test_training import ROOT, metrics, text_files, tiny_overrides  # noqa: F401 (text_files: fixture)

# Stated bound: the capacity run's held-out routed perplexity within 5% of the mask run's, its sparsity within
# 0.05, and no step's LM loss more than 0.1 away (measured: see the test's assertion messages).
PPL_BOUND, SPARSITY_BOUND, LOSS_BOUND = 0.05, 0.05, 0.1

RECIPE = ["routers.init=block_influence", "routers.init_margin=5", "routers.target_sparsity=0.25",
          "routers.target_sparsity_attn=0.4", "routers.target_sparsity_mlp=0.1", "optim.lr=0.05",
          "optim.max_steps=20", "checkpoint.every_steps=10"]


def stage1(tiny_model_dir, text_files, run_dir, *extra):
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), tiny_overrides(tiny_model_dir, text_files, run_dir,
                                                                        *RECIPE, *extra))
    return run(cfg).final_eval


@pytest.fixture(scope="module")
def twins(tiny_model_dir, text_files, tmp_path_factory):
    mask_dir, cap_dir = tmp_path_factory.mktemp("mask"), tmp_path_factory.mktemp("capacity")
    mask = stage1(tiny_model_dir, text_files, mask_dir, "routers.mode=mask")
    capacity = stage1(tiny_model_dir, text_files, cap_dir, "routers.mode=capacity",
                      "routers.capacity_plan=warm_start", "routers.marked_capacity=0.5")
    return (mask_dir, mask), (cap_dir, capacity)


def saved_router_config(run_dir) -> dict:
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    with safe_open(str(ckpt / "routers.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["skipgpt_router_config"])


def test_stage1_capacity_run_stays_with_its_mask_twin(twins):
    (mask_dir, mask), (cap_dir, capacity) = twins
    ratio = capacity["ppl_routed"] / mask["ppl_routed"]
    assert abs(math.log(ratio)) < PPL_BOUND, f"capacity / mask routed ppl {ratio:.4f}"
    for kind in ("attn_sparsity", "mlp_sparsity"):
        assert abs(capacity[kind] - mask[kind]) < SPARSITY_BOUND, (kind, capacity[kind], mask[kind])
    gaps = [abs(a["lm_loss"] - b["lm_loss"]) for a, b in zip(metrics(mask_dir), metrics(cap_dir))]
    print(f"capacity / mask routed ppl {ratio:.4f}, sparsity {capacity['sparsity']:.3f} / {mask['sparsity']:.3f}, "
          f"max LM loss gap {max(gaps):.4f}")
    assert len(gaps) == 20 and max(gaps) < LOSS_BOUND, f"max per-step LM loss gap {max(gaps):.4f}"


def test_the_plan_from_the_warm_start_is_saved_with_the_routers(twins):
    _, (cap_dir, _) = twins
    cfg = saved_router_config(cap_dir)
    plan = cfg["layer_capacity"]
    assert cfg["gate_grad"] == "probe" and cfg["capacity_plan"] == "warm_start"
    assert len(plan["attn"]) == len(plan["mlp"]) == 4
    # 40% of 4 attention layers and 10% of 4 MLPs are marked (round): those get 0.5, the rest every slot
    assert sorted(plan["attn"]) == [0.5, 0.5, 1.0, 1.0] and plan["mlp"] == [1.0] * 4


def test_stage2_and_evaluation_keep_the_stage1_plan(twins, tiny_model_dir, text_files, tmp_path):
    from skipgpt_dist.routing import routing_context
    from skipgpt_dist.training.restore import load_checkpoint_model

    _, (cap_dir, _) = twins
    plan = saved_router_config(cap_dir)["layer_capacity"]
    model, _, _ = load_checkpoint_model(str(cap_dir))
    assert routing_context(model).cfg.layer_capacity == plan  # eval_ppl, calibrate, report, merge load this way
    cfg = load_config(str(ROOT / "configs/tiny_stage2.yaml"), tiny_overrides(
        tiny_model_dir, text_files, tmp_path / "s2", f"stage.init_from={cap_dir}", "routers.mode=capacity",
        "optim.max_steps=2", "stage.lora.r=4", "checkpoint.every_steps=2"))
    run(cfg)
    assert saved_router_config(tmp_path / "s2")["layer_capacity"] == plan
    # a stage-2 config that sets its own capacity replaces the plan
    cfg = load_config(str(ROOT / "configs/tiny_stage2.yaml"), tiny_overrides(
        tiny_model_dir, text_files, tmp_path / "s2b", f"stage.init_from={cap_dir}", "routers.mode=capacity",
        "routers.capacity_attn=0.8", "optim.max_steps=1", "stage.lora.r=4", "checkpoint.every_steps=1"))
    run(cfg)
    saved = saved_router_config(tmp_path / "s2b")
    assert saved["layer_capacity"] is None and saved["capacity_attn"] == 0.8


def test_a_plan_without_the_warm_start_is_one_line_error():
    from skipgpt_dist.errors import SkipGPTError

    with pytest.raises(SkipGPTError, match="capacity_plan=warm_start plans slots from the block-influence"):
        load_config(None, ["routers.capacity_plan=warm_start", "routers.init=margin"])
    with pytest.raises(SkipGPTError, match="routers.marked_capacity=0"):
        load_config(None, ["routers.marked_capacity=0"])
    with pytest.raises(SkipGPTError, match="gate_grad=probe samples skipped tokens"):
        load_config(None, ["routers.mode=mask", "routers.gate_grad=probe"])


RECIPE_KEYS = ("mode", "gate_grad", "init", "init_margin", "init_skip_margin", "capacity_plan", "marked_capacity",
               "marked_capacity_mlp", "target_sparsity", "target_sparsity_attn", "target_sparsity_mlp",
               "temperature_start", "temperature_end")


@pytest.mark.parametrize("config", ["slurm/configs/stage1_70b.yaml", "slurm/configs/stage1_13b.yaml"])
def test_slurm_configs_run_the_recipe_the_demo_and_bench_measure(config):
    """One recipe: the cluster stage-1 configs route as the demo config does, in real-skipping mode, with the
    per-kind split bench/quality.py trains with (it trains on the cluster configs themselves), so the bench's
    targets and the configs' cannot drift apart again."""
    data = ["data.train_files=[builtin:general-train]"]
    cluster = load_config(str(ROOT / config), data, for_training=True).routers
    demo = load_config(str(ROOT / "configs/smollm2_stage1.yaml")).routers
    assert cluster.mode == "capacity" and cluster.gate_grad == "probe" and cluster.capacity_plan == "warm_start"
    # the per-kind split is the one the quality bench measured on general text (the demo keeps its plays' split)
    split = ("target_sparsity_attn", "target_sparsity_mlp")
    same = [k for k in RECIPE_KEYS if k not in split]
    assert {k: getattr(cluster, k) for k in same} == {k: getattr(demo, k) for k in same}
    from bench.quality import STAGE1_SPLIT, kind_targets
    bench_split = kind_targets(cluster.target_sparsity, **STAGE1_SPLIT)
    assert (cluster.target_sparsity_attn, cluster.target_sparsity_mlp) == pytest.approx(bench_split)


@pytest.mark.parametrize("config", ["slurm/configs/stage1_70b.yaml", "slurm/configs/stage2_70b.yaml"])
def test_a_model_of_ones_own_without_training_text_is_one_line_error(config):
    from skipgpt_dist.errors import SkipGPTError

    overrides = ["model.path=/models/Llama-2-70b-hf"] + (["stage.init_from=/x"] if "stage2" in config else [])
    with pytest.raises(SkipGPTError, match=r"model.path=/models/Llama-2-70b-hf needs its training text: set "
                                           r"data.train_files"):
        load_config(str(ROOT / config), overrides, for_training=True)
    cfg = load_config(str(ROOT / config), overrides + ["data.train_files=[/data/c]"], for_training=True)
    assert cfg.data.train_files == ["/data/c"]
    # the builtin models keep the plays as their default (the demo, the tests)
    assert load_config(None, ["model.path=builtin:tiny"], for_training=True).data.train_files == [
        "builtin:shakespeare-train"]
