"""Static pruning baselines (ShortGPT block influence) and router calibration, on tiny random models; the quality
benchmark's --quick mode end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_models import batch, build  # noqa: E402

from skipgpt_dist import routing_stats  # noqa: E402
from skipgpt_dist.routing.api import routing_context, routing_disabled  # noqa: E402
from skipgpt_dist.routing.calibrate import calibrate_routers, collect_margins  # noqa: E402
from skipgpt_dist.static_pruning import (BlockInfluence, attention_drop_plan, block_influence,  # noqa: E402
                                         layer_drop_plan, set_static_routing)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def ids(seed=0, rows=4, seq=24):
    return batch(seed, batch_size=rows, seq_len=seq)[0]


def test_block_influence_matches_a_direct_computation():
    model = build("llama_gqa", mode="mask")
    x = ids()
    influence = block_influence(model, x, micro_batch_size=4)
    with torch.no_grad(), routing_disabled(model):  # block influence is measured on the dense model
        hidden = model(input_ids=x, output_hidden_states=True).hidden_states
    for layer in range(len(influence.layer) - 1):  # the last hidden state is after the final norm
        cos = torch.nn.functional.cosine_similarity(hidden[layer], hidden[layer + 1], dim=-1).mean()
        assert influence.layer[layer] == pytest.approx(1 - float(cos), abs=1e-5)
    assert all(0.0 <= a <= 2.0 for a in influence.attn)


def test_plans_drop_the_least_influential_blocks():
    bi = BlockInfluence(layer=[0.9, 0.1, 0.3, 0.05, 0.5, 0.2, 0.4, 0.6], attn=[0.5, 0.01, 0.2, 0.02, 0.3, 0.03, 0.4, 0.6],
                        mlp=[0.5] * 8)
    assert layer_drop_plan(bi, 0.25) == ([1, 3], [1, 3])
    assert attention_drop_plan(bi, 0.25) == ([1, 2, 3, 5], [])  # round(2 * 0.25 * 8) = 4 attention sublayers
    attn, mlp = attention_drop_plan(bi, 0.40)  # round(2 * 0.4 * 8) = 6 attention sublayers
    assert len(attn) == 6 and mlp == [] and 7 not in attn and 0 not in attn


def test_static_routing_skips_exactly_the_planned_sublayers():
    model = build("llama_mha", mode="mask")
    set_static_routing(model, attn_skip=[0, 2], mlp_skip=[1])
    with torch.no_grad():
        model(input_ids=ids())
    layers = routing_stats(model)["layers"]
    assert [layer["attn"]["execute"] for layer in layers] == [0.0, 1.0, 0.0]
    assert [layer["mlp"]["execute"] for layer in layers] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("method", ["per_layer", "global"])
def test_calibration_meets_the_target_with_deterministic_gates(method):
    model = build("llama_gqa", mode="mask", target_sparsity=0.3)
    x = ids(rows=6, seq=32)
    calibrate_routers(model, x, method=method, micro_batch_size=6, passes=3)
    with torch.no_grad():
        model(input_ids=x)
    stats = routing_stats(model)
    skipped = 1 - (stats["attn_execute"] + stats["mlp_execute"]) / 2
    assert skipped == pytest.approx(0.3, abs=0.03)


def test_per_layer_rescale_meets_a_target_that_clamps_some_layers():
    """A high target pushes the most-skipping layers to all of their tokens: the others take up the rest, in their
    trained proportions, so the rates still average to the target (one rescale then a clamp fell short)."""
    from skipgpt_dist.routing.calibrate import rescale_to_mean

    rates = torch.tensor([0.9, 0.6, 0.3, 0.0, 0.2], dtype=torch.float64)
    out = rescale_to_mean(rates, 0.5)
    assert float(out.mean()) == pytest.approx(0.5, abs=1e-9)
    assert out[0] == 1.0 and out[3] == 0.0 and float(out[1] / out[2]) == pytest.approx(2.0)
    assert float((rates * 0.5 / rates.mean()).clamp(max=1.0).mean()) == pytest.approx(0.475)  # the old rule
    assert rescale_to_mean(rates, 0.2).tolist() == pytest.approx((rates / 2).tolist())  # nothing clamps
    assert rescale_to_mean(rates, 0.95).tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]  # beyond reach: all that can


def test_calibration_keeps_per_layer_rates_and_only_moves_biases():
    model = build("llama_mha", mode="mask", target_sparsity=0.2)
    # distinct tokens: layer 0's routers read token embeddings, and repeated tokens would tie at the threshold
    x = torch.randperm(97, generator=torch.Generator().manual_seed(0))[:96].view(3, 32)
    before = {k: v.clone() for k, v in model.state_dict().items() if "skipgpt" in k}
    margins = collect_margins(model, x, 3)
    expected = [float(torch.sigmoid(-m).mean()) for m in margins["attn"] + margins["mlp"]]
    calibrate_routers(model, x, method="per_layer", micro_batch_size=3, passes=1)
    after = {k: v for k, v in model.state_dict().items() if "skipgpt" in k}
    for key in before:
        if key.endswith("weight"):
            assert torch.equal(before[key], after[key]), key
    shifted = collect_margins(model, x, 3)
    # one pass: the layer-0 rates are exact (later layers see hidden states changed by the layers below)
    scale = 0.2 / (sum(expected) / len(expected))
    for kind, i in (("attn", 0), ("mlp", len(margins["attn"]))):
        rate = float(shifted[kind][0].lt(0).float().mean())
        assert rate == pytest.approx(min(1.0, expected[i] * scale), abs=1.0 / len(shifted[kind][0]) + 1e-6)


def test_per_kind_targets_are_calibrated_separately():
    model = build("llama_gqa", mode="mask", target_sparsity_attn=0.5, target_sparsity_mlp=0.1)
    x = ids(rows=6, seq=32)
    calibrate_routers(model, x, method="global", micro_batch_size=6, passes=3)
    with torch.no_grad():
        model(input_ids=x)
    stats = routing_stats(model)
    assert 1 - stats["attn_execute"] == pytest.approx(0.5, abs=0.04)
    assert 1 - stats["mlp_execute"] == pytest.approx(0.1, abs=0.04)
    assert routing_context(model).cfg.target_sparsity_attn == 0.5


def test_norm_oracle_keeps_the_base_weights_and_meets_its_target():
    """bench/norm_oracle.py: with no threshold it is the dense base (the same perplexity as the routed model with
    routing off); calibrated, it skips about the target; an infinite threshold drops every sublayer output."""
    sys.path.insert(0, str(ROOT))
    from bench.norm_oracle import NormOracle
    from skipgpt_dist.training.evaluate import evaluate

    model = build("llama_gqa", mode="mask")
    x = ids(rows=6, seq=32)
    oracle = NormOracle(model)
    assert oracle.perplexity(x, 3) == pytest.approx(evaluate(model, x, 3)["ppl_dense"], rel=1e-5)
    assert oracle.sparsity() == (0.0, 0.0)  # collecting: nothing skipped
    oracle.calibrate(x, 0.3, 3, steps=8)
    oracle.perplexity(x, 3)
    attn, mlp = oracle.sparsity()
    assert (attn + mlp) / 2 == pytest.approx(0.3, abs=0.03)
    oracle.threshold = float("inf")
    oracle.perplexity(x, 3)
    assert oracle.sparsity() == (1.0, 1.0)


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quality") / "quick"
    # one sparsity keeps it to 3 two-rank FSDP2 runs (the torchrun start-up dominates at this size)
    proc = subprocess.run([sys.executable, str(ROOT / "bench/quality.py"), "--quick", "--out", str(out),
                           "--sparsities", "0.40"], capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return out


def test_quality_bench_quick_runs_the_cluster_recipe_end_to_end(quick_bench):
    out = quick_bench
    report = (out / "quality.md").read_text()
    for method in ("dense", "ShortGPT layer drop", "ShortGPT attention drop", "Output-norm oracle (reference)",
                   "SkipGPT stage 1, capacity (recipe)", "SkipGPT stage 1, mask (reference)",
                   "SkipGPT stage 1, calibrated to the target (served)", "SkipGPT stage 1 + 2 (calibrated, LoRA)"):
        assert method in report
    assert "slurm/configs/stage1_70b.yaml" in report and "2-rank FSDP2" in report
    data = json.loads((out / "quality.json").read_text())
    assert {r["target"] for r in data["rows"]} == {0.40} and data["ranks"] == 2
    assert len(data["runs"]) == 3 and all(r["steps"] > 0 for r in data["runs"])
    assert (out / "quality.png").stat().st_size > 1000
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["ShortGPT layer drop"]["sparsity"] == pytest.approx(0.4, abs=0.13)  # whole layers of 4
    # general held-out text and Hamlet for every trained row; capacity mode skipped compute while it trained
    for method in ("SkipGPT stage 1, capacity (recipe)", "SkipGPT stage 1, mask (reference)"):
        assert rows[method]["ppl"] > 1 and rows[method]["ppl_hamlet"] > 1
    assert rows["SkipGPT stage 1, capacity (recipe)"]["train_flops_skipped"] > 0.05
    assert rows["SkipGPT stage 1, mask (reference)"]["train_flops_skipped"] == 0.0
    assert rows["SkipGPT stage 1 + 2 (calibrated, LoRA)"]["sparsity"] > 0.3  # calibrated in the job
    # stage 1 as stage 2 receives it: the calibrated copy, scored in the bench's process as eval_ppl scores it
    calibrated = rows["SkipGPT stage 1, calibrated to the target (served)"]
    assert (out / "stage1_capacity_40_calibrated" / "routers.safetensors").is_file()
    assert calibrated["sparsity"] > 0.3 and calibrated["ppl_hamlet"] > 1
    line = subprocess.run([sys.executable, str(ROOT / "tools/eval_ppl.py"), str(out / "stage1_capacity_40_calibrated"),
                           "--data", "builtin:shakespeare-eval", "--sequences", "4", "--mode", "mask"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert line.returncode == 0, line.stderr[-2000:]
    assert json.loads(line.stdout.strip().splitlines()[-1])["ppl_routed"] == pytest.approx(calibrated["ppl_hamlet"],
                                                                                          rel=1e-6)
    for name in ("stage1_capacity_40", "stage1_mask_40", "stage2_40"):
        config = (out / name / "config.yaml").read_text()
        assert "backend: fsdp2" in config, name  # the distributed path ran
    assert "x routing off" in report and all(r["ppl_routing_off"] > 1 for r in data["rows"])
    from safetensors.torch import load_file

    from skipgpt_dist.checkpoint import find_checkpoint
    trained = load_file(str(find_checkpoint(out / "stage2_40") / "portable" / "params.safetensors"))
    assert any("skipgpt_" in k for k in trained) and any("lora_" in k for k in trained)  # routers hold the target


def test_calibrate_tool_writes_a_copy_with_new_router_biases(quick_bench, tmp_path):
    from safetensors.torch import load_file

    from skipgpt_dist.checkpoint import find_checkpoint

    source = find_checkpoint(quick_bench / "stage1_capacity_40")
    out = tmp_path / "cal"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/calibrate_routers.py"), str(source), "--out", str(out),
                           "--sparsity", "0.5", "--method", "global"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["sparsity"] == pytest.approx(0.5, abs=0.1)
    old, new = load_file(str(source / "routers.safetensors")), load_file(str(out / "routers.safetensors"))
    assert set(old) == set(new)
    assert all(torch.equal(old[k], new[k]) for k in old if k.endswith("weight"))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.endswith("bias"))
    assert (out / "trainer_state.json").is_file()
    from skipgpt_dist.checkpoint import verify_checkpoint

    assert verify_checkpoint(out) is None  # the copy is a verified checkpoint: checkpoint.resume may name it
    # an existing --out is refused, untouched
    before = (out / "routers.safetensors").read_bytes()
    again = subprocess.run([sys.executable, str(ROOT / "tools/calibrate_routers.py"), str(source), "--out", str(out)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: --out")
    assert (out / "routers.safetensors").read_bytes() == before


def test_quality_bench_rejects_a_bad_sparsity():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/quality.py"), "--quick", "--sparsities", "1.5"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --sparsities 1.5 is out of range")


def test_init_margin_sets_the_starting_margin_and_is_validated():
    from skipgpt_dist import RouterConfig, attach_routers
    from skipgpt_dist.errors import SkipGPTError
    from skipgpt_dist.routing.api import routed_layers

    model = build("llama_mha", mode="mask")  # only for its family; attach a fresh copy below
    fresh = type(model)(model.config).eval()
    attach_routers(fresh, RouterConfig(mode="mask", init_margin=5.0))
    margins = collect_margins(fresh, ids(), 4)
    for m in margins["attn"] + margins["mlp"]:
        assert m.mean() == pytest.approx(5.0, abs=0.5)  # weights start at std 0.01 on a unit-RMS input
    assert routed_layers(fresh)[0].skipgpt_attn_router.net.bias.tolist() == [2.5, -2.5]
    with pytest.raises(SkipGPTError, match="routers.init_margin"):
        RouterConfig(init_margin=100)


def test_block_influence_warm_start_marks_the_least_influential_sublayers():
    from skipgpt_dist.static_pruning import init_routers_from_influence
    from skipgpt_dist.routing.api import routed_layers

    model = build("llama_gqa", mode="mask")
    bi = BlockInfluence(layer=[0.9, 0.2, 0.5], attn=[0.3, 0.01, 0.02], mlp=[0.5, 0.4, 0.03])
    attn, mlp = init_routers_from_influence(model, bi, (1 / 3, None), execute_margin=5.0, skip_margin=-1.0)
    assert (attn, mlp) == ([1, 2], [])  # round(1/3 * 6) = 2 lowest of the six sublayers
    attn, mlp = init_routers_from_influence(model, bi, (1 / 3, 1 / 3), execute_margin=5.0, skip_margin=-1.0)
    assert (attn, mlp) == ([1], [2])
    biases = [(l.skipgpt_attn_router.net.bias.tolist(), l.skipgpt_mlp_router.net.bias.tolist())
              for l in routed_layers(model)]
    assert biases[1][0] == [-0.5, 0.5] and biases[2][1] == [-0.5, 0.5] and biases[0][0] == [2.5, -2.5]


def test_calibrating_one_kind_meets_the_overall_target_and_leaves_the_other():
    model = build("llama_gqa", mode="mask", target_sparsity=0.3)
    x = ids(rows=6, seq=32)
    mlp_before = {k: v.clone() for k, v in model.state_dict().items() if "mlp_router" in k}
    calibrate_routers(model, x, method="per_layer", micro_batch_size=6, passes=3, kinds=("attn",))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in mlp_before.items())
    with torch.no_grad():
        model(input_ids=x)
    stats = routing_stats(model)
    assert 1 - (stats["attn_execute"] + stats["mlp_execute"]) / 2 == pytest.approx(0.3, abs=0.03)
    with pytest.raises(ValueError, match="kinds"):
        calibrate_routers(model, x, kinds=("ffn",))
