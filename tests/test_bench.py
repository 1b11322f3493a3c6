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
