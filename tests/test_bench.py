"""Smoke test: the routed-forward benchmark runs end to end in its quick mode and prints its JSON line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_routed_forward_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/routed_forward.py"), "--quick", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    variants = {v["variant"]: v for v in result["variants"]}
    assert {"dense", "mask/all", "capacity0.75/all", "capacity0.60/all"} <= set(variants)
    assert variants["capacity0.75/all"]["routing"]["eval"]["attn_execute"] == 0.75
    # the cluster recipe's own slots (slurm/configs/stage1_70b.yaml, capacity_plan=warm_start) on the 4 quick layers:
    # round(0.5 * 4) = 2 marked attention layers at 0.75, the rest (MLPs included) every slot
    recipe = variants["recipe/all"]
    assert recipe["mean_capacity"] == {"attn": 0.875, "mlp": 1.0}
    assert recipe["routing"]["eval"]["attn_execute"] == pytest.approx(0.875, abs=0.01)
    assert recipe["ideal_forward"] < 1.0 and "train_gap" in recipe
    assert result["allocator"] == "keep" and all(v["forward_page_faults"] >= 0 for v in variants.values())


def test_keep_freed_memory_stops_first_touch_faults_on_reuse():
    """Without it, a 64 MB buffer freed and allocated again is a fresh mapping (glibc mmaps chunks that large and
    unmaps them on free): every call faults all its pages in again. With it, once the heap has grown to the working
    set (a few calls: aligned allocations do not always fit the chunk just freed), calls reuse faulted-in pages."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import torch
from bench.common import keep_freed_memory, minor_faults

def faults_of_a_fresh_64mb_buffer():
    before = minor_faults()
    torch.ones(16 << 20)  # 64 MB of float32, written and freed
    return minor_faults() - before

print(max(faults_of_a_fresh_64mb_buffer() for _ in range(3)))
assert keep_freed_memory()
for _ in range(20):
    faults_of_a_fresh_64mb_buffer()
print(max(faults_of_a_fresh_64mb_buffer() for _ in range(5)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    default, kept = (int(line) for line in proc.stdout.split())
    assert default > 10_000 and kept < 100, (default, kept)


def test_generate_quick_runs(tiny_model_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "bench/generate.py"), "--quick", "--repeats", "1",
                           "--model", tiny_model_dir, "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| variant |" in proc.stdout  # the markdown table
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["allocator"] == ("keep" if sys.platform.startswith("linux") else "default")
    variants = {v["variant"]: v for v in result["variants"]}
    assert set(variants) == {"dense", "skip25/all", "skip40/all", "skip25/routed", "skip40/routed"}
    for name, v in variants.items():
        assert v["prefill_tok_s"] > 0 and v["decode_tok_s"] > 0 and v["kv_bytes"] > 0, name
    # calibrated routers skip about the requested fraction of the prompt (it is not the calibration text)
    executed = variants["skip40/routed"]["executed"]["prefill"]
    assert 0.45 < executed["attn_execute"] < 0.75 and 0.45 < executed["mlp_execute"] < 0.75
    # kv_policy=routed stores only executed tokens (plus a position and a flag per entry); `all` stores every one
    routed = variants["skip40/routed"]
    assert routed["kv_expected"] < 0.8 and routed["kv_expected"] <= routed["kv_ratio"] < routed["kv_expected"] * 1.05
    assert variants["skip40/all"]["kv_ratio"] >= 1.0


# ---------------------------------------------------------------- --device / --dtype / --shape


def test_shape_builder_is_shared_and_gives_the_llama2_7b_slice():
    """One home for the random-weight shapes (bench/common.SHAPES), used by both benches; the 7B slice's numbers."""
    sys.path.insert(0, str(ROOT))
    import bench.common as common
    import bench.generate as generate
    import bench.routed_forward as routed_forward

    assert generate.SHAPES is common.SHAPES
    config = common.shape_config("llama2-7b-4l", layers=1, max_positions=8192)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (1, 4096, 32, 32, 11008, 32000,
                                                                                        False)
    assert config.max_position_embeddings == 8192 and common.SHAPES["llama2-7b-4l"]["num_hidden_layers"] == 4
    # the options the GPU check passes are accepted on cpu (parsing only: the real slice is ~1B parameters)
    args = routed_forward.parse_args(["--device", "cpu", "--dtype", "bfloat16", "--shape", "llama2-7b-4l"])
    assert (args.device, args.dtype, args.shape, args.layers, args.seq_len, args.iters, args.warmup) == \
        ("cpu", "bfloat16", "llama2-7b-4l", 4, 1024, 1, 0)
    assert routed_forward.parse_args(["--quick"]).dtype == "float32"
    args = generate.parse_args(["--device", "cpu", "--dtype", "bfloat16", "--shape", "llama2-7b-4l"])
    assert (args.dtype, args.inference_slots, args.model) == ("bfloat16", "dynamic", "builtin:tiny")
    # a tiny model of the slice's family builds in the requested dtype
    tiny = common.shape_config("llama2-7b-4l", layers=1, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
    model = common.build_random_model(tiny, torch.bfloat16, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and len(model.model.layers) == 1


def _routed_forward_json(extra: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench/routed_forward.py"), "--quick", "--repeats", "1",
                           "--kv-policy", "all", *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_routed_forward_bf16_on_cpu_records_where_it_ran():
    result = _routed_forward_json(["--dtype", "bfloat16", "--layers", "2", "--seq-len", "64"])
    assert (result["device"], result["dtype"], result["shape"], result["inference_slots"]) == \
        ("cpu", "bfloat16", "smollm2", "static")
    assert result["torch"] == torch.__version__ and result["device_name"]
    variants = {v["variant"]: v for v in result["variants"]}
    assert variants["capacity0.75/all"]["routing"]["eval"]["attn_execute"] == 0.75
    # the cluster recipe's own slots (slurm/configs/stage1_70b.yaml, capacity_plan=warm_start) on the 4 quick layers:
    # round(0.5 * 4) = 2 marked attention layers at 0.75, the rest (MLPs included) every slot
    recipe = variants["recipe/all"]
    assert recipe["mean_capacity"] == {"attn": 0.875, "mlp": 1.0}
    assert recipe["routing"]["eval"]["attn_execute"] == pytest.approx(0.875, abs=0.01)
    assert recipe["ideal_forward"] < 1.0 and "train_gap" in recipe
    assert all("forward_page_faults" in v and "forward_peak_mib" not in v for v in variants.values())


@pytest.mark.gpu
def test_routed_forward_on_cuda_quick():
    result = _routed_forward_json(["--device", "cuda", "--dtype", "bfloat16", "--warmup", "1", "--iters", "2"])
    assert (result["device"], result["dtype"], result["inference_slots"]) == ("cuda", "bfloat16", "static")
    assert result["device_name"] == torch.cuda.get_device_name() and result["cuda"] == torch.version.cuda
    assert result["allocator"].startswith("ignored") and result["cuda_resident_mib"] > 0
    variants = {v["variant"]: v for v in result["variants"]}
    assert {"dense", "mask/all", "capacity0.75/all", "capacity0.60/all"} <= set(variants)
    assert variants["capacity0.75/all"]["routing"]["eval"]["attn_execute"] == 0.75
    # the cluster recipe's own slots (slurm/configs/stage1_70b.yaml, capacity_plan=warm_start) on the 4 quick layers:
    # round(0.5 * 4) = 2 marked attention layers at 0.75, the rest (MLPs included) every slot
    recipe = variants["recipe/all"]
    assert recipe["mean_capacity"] == {"attn": 0.875, "mlp": 1.0}
    assert recipe["routing"]["eval"]["attn_execute"] == pytest.approx(0.875, abs=0.01)
    assert recipe["ideal_forward"] < 1.0 and "train_gap" in recipe
    for name, v in variants.items():
        assert v["forward_ms"] > 0 and v["train_ms"] > 0 and v["forward_peak_mib"] >= 0, name
        assert "forward_page_faults" not in v, name


@pytest.mark.gpu
def test_generate_on_cuda_quick(tiny_model_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "bench/generate.py"), "--quick", "--repeats", "1",
                           "--model", tiny_model_dir, "--device", "cuda", "--kv-policy", "all", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["device"], result["dtype"], result["inference_slots"]) == ("cuda", "bfloat16", "static")
    assert result["device_name"] == torch.cuda.get_device_name() and result["cuda_max_memory_allocated_mib"] > 0
    for v in result["variants"]:
        assert v["prefill_tok_s"] > 0 and v["decode_tok_s"] > 0, v["variant"]


def test_compare_trees_tables_each_trees_own_ratios_and_refuses_a_tree_without_the_bench(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.compare_trees import compare

    def record(ratio):
        return {"variants": [{"variant": "dense", "forward_ratio": 1.0, "train_ratio": 1.0},
                             {"variant": "capacity0.75/all", "forward_ratio": ratio, "train_ratio": 2 * ratio}]}

    lines = compare("routed_forward", {"base": [record(0.8), record(1.0)], "new": [record(0.9), record(0.9)]})
    row = next(line for line in lines if line.startswith("| capacity0.75/all"))
    # medians: base 0.9 (forward) / 1.8 (train), new 0.9 / 1.8 -> new / base 1.000 for both; noise: base's rounds
    # differ by 1.0 / 0.8 - 1 = 25%
    assert row == "| capacity0.75/all | 0.900 | 0.900 | 1.000 | 25.0% | 1.800 | 1.800 | 1.000 | 25.0% |"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/compare_trees.py"), "--base", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "has no bench/" in proc.stderr and "git worktree add" in proc.stderr
