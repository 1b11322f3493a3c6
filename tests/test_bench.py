"""Smoke test: the routed-forward benchmark runs end to end in its quick mode and prints its JSON line."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_routed_forward_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/routed_forward.py"), "--quick", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    variants = {v["variant"]: v for v in result["variants"]}
    assert {"dense", "mask/all", "capacity0.75/all", "capacity0.60/all"} <= set(variants)
    assert variants["capacity0.75/all"]["routing"]["eval"]["attn_execute"] == 0.75
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
