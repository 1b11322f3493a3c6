"""Production settings (issue #15 item 6) and the GPU check script.

- ds_configs/ hold production DeepSpeed settings (the built-in default is the same ZeRO-3); the CPU tests lay their
  own settings over them (tests/dist_helpers.py ZERO3_CPU_TEST_OVERRIDES).
- slurm/: BACKEND=deepspeed without DS_CONFIG uses ds_configs/zero3.json.
- The FSDP2 loader reads only each rank's rows of each tensor (2 ranks, torchrun, counted at safe_open).
- scripts/gpu_check.sh on a machine without CUDA: a dry run that names only files and options that exist.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import REPO, ZERO3_CPU_TEST_OVERRIDES, child_env, zero3_all_sharded  # noqa: E402

PRODUCTION = ("zero3.json", "zero3_offload.json")


def ds_file(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / name).read_text())


# ---------------------------------------------------------------- DeepSpeed settings


@pytest.mark.parametrize("name", PRODUCTION)
def test_shipped_zero3_configs_are_production_settings(name):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = ds_file(name)["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["stage3_prefetch_bucket_size"] >= 10 ** 7
    assert zero["stage3_param_persistence_threshold"] >= 10 ** 4
    assert zero["stage3_model_persistence_threshold"] >= 10 ** 9
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 10 ** 9
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    assert "auto" not in json.dumps(zero)  # resolve_ds_config fills "auto" only outside zero_optimization
    parsed = DeepSpeedZeroConfig(**zero)  # DeepSpeed's own validation accepts every value
    assert parsed.overlap_comm and parsed.prefetch_bucket_size == zero["stage3_prefetch_bucket_size"]
    assert ds_file("zero2.json")["zero_optimization"]["overlap_comm"] is True


def test_built_in_default_is_the_production_zero3(tmp_path):
    from skipgpt_dist.config import load_config
    from skipgpt_dist.training.deepspeed_engine import DEFAULT_DS_CONFIG, resolve_ds_config

    assert DEFAULT_DS_CONFIG == ds_file("zero3.json")
    ds = resolve_ds_config(load_config(None, ["parallel.backend=deepspeed", "optim.micro_batch_size=2"]), 1)
    assert ds["zero_optimization"] == ds_file("zero3.json")["zero_optimization"]
    assert "auto" not in json.dumps(ds) and ds["train_batch_size"] == 2


def test_cpu_tests_use_their_own_zero3_settings_over_the_production_file(tmp_path):
    data = json.loads(zero3_all_sharded(tmp_path).read_text())
    zero, production = data["zero_optimization"], ds_file("zero3.json")["zero_optimization"]
    assert ZERO3_CPU_TEST_OVERRIDES == {"overlap_comm": False, "stage3_prefetch_bucket_size": 0,
                                        "stage3_param_persistence_threshold": 0,
                                        "stage3_model_persistence_threshold": 0}
    assert zero == {**production, **ZERO3_CPU_TEST_OVERRIDES}
    assert {k: v for k, v in data.items() if k != "zero_optimization"} == \
        {k: v for k, v in ds_file("zero3.json").items() if k != "zero_optimization"}


# ---------------------------------------------------------------- Slurm: BACKEND=deepspeed -> ds_configs/zero3.json


def slurm_train_args(tmp_path, **env) -> list[str]:
    """TRAIN_ARGS as slurm/common.sh builds them (its preflight replaced by a stub that succeeds)."""
    stub = tmp_path / "python_stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    script = (f"source {shlex.quote(str(REPO / 'slurm' / 'common.sh'))}; OVERRIDES=(); "
              "skipgpt_resolve_and_check; printf '%s\\n' \"${TRAIN_ARGS[@]}\"")
    base = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SKIPGPT_REPO": str(REPO), "STAGE": "1",
            "DEFAULT_CONFIG": str(REPO / "configs" / "tiny.yaml"), "DEFAULT_GPUS_PER_NODE": "0",
            "DEFAULT_OUT_NAME": "t", "PYTHON": str(stub)}
    full = {k: v for k, v in os.environ.items() if k not in ("BACKEND", "DS_CONFIG")} | base | env
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_slurm_deepspeed_without_ds_config_uses_the_production_zero3(tmp_path):
    args = slurm_train_args(tmp_path, BACKEND="deepspeed")
    assert args[args.index("--ds_config") + 1] == str(REPO / "ds_configs" / "zero3.json")
    offload = str(REPO / "ds_configs" / "zero3_offload.json")
    args = slurm_train_args(tmp_path, DS_CONFIG=offload)
    assert args[args.index("--ds_config") + 1] == offload
    args = slurm_train_args(tmp_path)  # default fsdp2: no DeepSpeed config at all
    assert "--ds_config" not in args and "parallel.backend=fsdp2" in args


# ---------------------------------------------------------------- FSDP2: each rank reads only its rows

LOADER_SCRIPT = r'''
import json, math, os, sys
import torch, torch.distributed as dist
import safetensors
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.environ["REPO"])
from skipgpt_dist.config import load_config
from skipgpt_dist.training import fsdp2_engine as F
from skipgpt_dist.training import fsdp2_loading as L  # the meta build and shard loading
from skipgpt_dist.training.model_setup import build_model

READ = {}  # key -> elements this rank read from the files


class CountingSlice:
    def __init__(self, key, piece):
        self.key, self.piece = key, piece

    def get_shape(self):
        return self.piece.get_shape()

    def __getitem__(self, index):
        out = self.piece[index]
        READ[self.key] = READ.get(self.key, 0) + out.numel()
        return out


class CountingFile:
    def __init__(self, *args, **kwargs):
        self.f = REAL(*args, **kwargs)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_slice(self, key):
        return CountingSlice(key, self.f.get_slice(key))

    def get_tensor(self, key):
        out = self.f.get_tensor(key)
        READ[key] = READ.get(key, 0) + out.numel()
        return out


REAL = safetensors.safe_open
safetensors.safe_open = CountingFile

model_dir, out_dir = sys.argv[1], sys.argv[2]
cfg = load_config(None, [f"model.path={model_dir}", "parallel.backend=fsdp2", "routers.mode=capacity"])
F.setup(cfg)
rank, world = dist.get_rank(), dist.get_world_size()
report = {"rank": rank, "world": world}

# 1. the project's path: meta build, fully_shard, load (tiny Llama)
model, _, _ = build_model(cfg, load_base=L.load_base_on_meta)
files = L.weight_files(model_dir)
model = F.apply_fsdp2(model, cfg)
L.check_materialized(model)
full = {}
for path in files:
    full.update(load_file(path))
named = dict(L.hf_model(model).named_parameters())
report["tiny"] = {}
for key, tensor in full.items():
    param = named.get(key)
    if param is None:  # a tied alias: read once under its other name
        continue
    same = bool(torch.equal(param.full_tensor().float(), tensor.float()))
    report["tiny"][key] = {"numel": tensor.numel(), "rows": tensor.shape[0], "read": READ.get(key, 0),
                           "same": same}

# 2. odd shapes: rows not divisible by the world size, a parameter with fewer rows than ranks
READ.clear()
weights = {"a": torch.randn(5, 3), "b": torch.randn(1, 4), "c": torch.randn(7)}
if rank == 0:
    save_file(weights, os.path.join(out_dir, "odd.safetensors"))
dist.barrier()
weights = load_file(os.path.join(out_dir, "odd.safetensors"))
odd = torch.nn.Module()
for k, v in weights.items():
    odd.register_parameter(k, torch.nn.Parameter(torch.empty(v.shape, device="meta"), requires_grad=False))
aliases = L.to_placeholders(odd)
L.placeholders_to_meta(odd)
from torch.distributed.fsdp import fully_shard
fully_shard(odd, mesh=F.device_mesh())
L.materialize(odd, "cpu")
L.load_into_shards(odd, {"dir": out_dir, "files": [os.path.join(out_dir, "odd.safetensors")], "aliases": aliases})
report["odd"] = {k: {"numel": v.numel(), "rows": v.shape[0], "read": READ.get(k, 0),
                     "local_rows": getattr(odd, k).to_local().shape[0],
                     "same": bool(torch.equal(getattr(odd, k).full_tensor(), v))} for k, v in weights.items()}
# one file per rank: two ranks' ~4 KB lines on one stdout pipe can splice into each other (writes over PIPE_BUF)
with open(os.path.join(out_dir, f"report_{report['rank']}.json"), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
'''


def test_fsdp2_loader_reads_only_each_ranks_rows(tmp_path, tiny_model_dir):
    script = tmp_path / "load.py"
    script.write_text(LOADER_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), tiny_model_dir, str(tmp_path)], cwd=REPO,
                          env=child_env({"REPO": str(REPO)}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("report_*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    world = 2
    for part in ("tiny", "odd"):
        keys = set(reports[0][part])
        assert keys and all(set(r[part]) == keys for r in reports)
        for key in keys:
            entries = [r[part][key] for r in sorted(reports, key=lambda r: r["rank"])]
            numel, rows = entries[0]["numel"], entries[0]["rows"]
            per_row = numel // rows
            chunk = math.ceil(rows / world)  # torch.chunk / Shard(0): rank r holds rows [r*chunk, (r+1)*chunk)
            for rank, e in enumerate(entries):
                assert e["same"], (part, key, rank)
                own_rows = max(0, min(rows, (rank + 1) * chunk) - rank * chunk)
                assert e["read"] == own_rows * per_row, (part, key, rank, e, own_rows)
            assert sum(e["read"] for e in entries) == numel, (part, key)  # every element read once, in all
    assert [reports[r]["odd"]["b"]["local_rows"] for r in (0, 1)] in ([1, 0], [0, 1])
    big = max(reports[0]["tiny"].values(), key=lambda e: e["numel"])
    assert big["read"] == big["numel"] // world  # the largest tensor: each rank reads exactly half


# ---------------------------------------------------------------- scripts/gpu_check.sh without CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the dry run of a machine without CUDA")
def test_gpu_check_without_cuda_is_a_dry_run_of_commands_that_exist(tmp_path):
    env = child_env({"GPU_CHECK_OUT": str(tmp_path / "out")})
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "gpu_check: no CUDA device here; dry run only (nothing measured)"
    assert not (tmp_path / "out").exists() and not list((REPO / "runs" / "gpu_check").glob("TIME"))
    planned = {}
    for line in lines:
        if line.startswith(("gpu_check: would run [", "gpu_check: would skip [")):
            name = line.split("[", 1)[1].split("]", 1)[0]
            planned[name] = shlex.split(line.split("): ", 1)[1])
    benches = {"bench_routed_forward_smollm2", "bench_routed_forward_llama2_7b_4l", "bench_generate_smollm2",
               "bench_generate_llama2_7b_4l", "bench_routed_forward_smollm2_compile",
               "bench_routed_forward_llama2_7b_4l_compile"}
    assert {"assets", "pytest_gpu", "smoke_fsdp2", "smoke_zero3", "smoke_stage2", "tool_calibrate",
            "tool_eval_ppl"} | benches <= set(planned), lines
    for name in ("tool_calibrate", "tool_eval_ppl"):
        assert planned[name][planned[name].index("--device") + 1] == "cuda", name
    # every bench runs (none skipped for a missing option), on the GPU in bf16, each shape its own step
    assert not [line for line in lines if line.startswith("gpu_check: would skip [bench_")], lines
    for name in benches:
        cmd = planned[name]
        assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--dtype") + 1] == "bfloat16", name
        assert ("--compile" in cmd) == name.endswith("_compile"), name
        if "llama2_7b_4l" in name:
            assert cmd[cmd.index("--shape") + 1] == "llama2-7b-4l", name
    helps = {}
    for name, cmd in planned.items():
        for arg in cmd:
            if arg.endswith((".py", ".json", ".yaml", ".sh")) and "=" not in arg:
                assert (REPO / arg).is_file(), (name, arg)
        if cmd[1].startswith("bench/"):  # every option the command passes is one the bench has
            if cmd[1] not in helps:  # (one --help per script: each costs a torch import)
                helps[cmd[1]] = subprocess.run([sys.executable, cmd[1], "--help"], cwd=REPO, env=env,
                                               capture_output=True, text=True, timeout=120)
            help_text = helps[cmd[1]]
            assert help_text.returncode == 0, help_text.stderr
            for arg in cmd[2:]:
                if arg.startswith("--"):
                    assert arg in help_text.stdout, (name, arg)
    # the smoke runs are the Slurm configs (the cluster recipe), valid for both back ends (keys, values, the
    # ZeRO-3 file), scaled down only in model, data, sizes and steps
    from skipgpt_dist.config import load_config

    for name, config_file in (("smoke_fsdp2", "slurm/configs/stage1_70b.yaml"),
                              ("smoke_zero3", "slurm/configs/stage1_70b.yaml"),
                              ("smoke_stage2", "slurm/configs/stage2_70b.yaml")):
        cmd = planned[name]
        rest = cmd[cmd.index("train.py") + 1:]
        assert rest[rest.index("--config") + 1] == config_file, name
        overrides = [a for a in rest if "=" in a and not a.startswith("--")]
        if "--ds_config" in rest:
            overrides += ["parallel.backend=deepspeed", f"parallel.ds_config={rest[rest.index('--ds_config') + 1]}"]
        cfg, cluster = load_config(str(REPO / config_file), overrides), load_config(str(REPO / config_file))
        assert cfg.routers == cluster.routers, name  # the recipe's routing, untouched
        assert (cfg.stage.stage, cfg.stage.calibrate.enabled) == (cluster.stage.stage, cluster.stage.calibrate.enabled)
        assert cfg.parallel.mixed_precision == "bf16" and cfg.parallel.activation_checkpointing, name
        assert cfg.model.path == "builtin:smollm2-135m" and cfg.data.train_files == ["builtin:general-train"], name
    assert "stage.init_from=runs/gpu_check/TIME/smoke_fsdp2" in planned["smoke_stage2"]  # stage 2 on stage 1's run
    assert "--shape" in planned["bench_generate_llama2_7b_4l"]


# ---------------------------------------------------------------- bench/generate.py --shape


def test_generate_shape_option_builds_a_random_model_of_that_shape(tiny_model_dir):
    """--shape llama2-7b-4l at a reduced width (the real one is 1B parameters: too big for a CPU test)."""
    code = ("import json, sys; sys.path.insert(0, '.'); import bench.generate as g; "
            "assert g.parse_args(['--shape', 'llama2-7b-4l']).model == 'builtin:tiny'; "
            "s = g.SHAPES['llama2-7b-4l']; "
            "assert (s['num_hidden_layers'], s['hidden_size'], s['num_attention_heads'], s['intermediate_size'], "
            "s['vocab_size']) == (4, 4096, 32, 11008, 32000); "
            "s.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4); "
            f"g.main(['--shape', 'llama2-7b-4l', '--model', {tiny_model_dir!r}, '--quick', '--repeats', '1', "
            "'--kv-policy', 'all', '--skips', '0.25', '--json'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama2-7b-4l (random weights): 4 layers, hidden 64" in proc.stdout
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["shape"] == "llama2-7b-4l"
    assert [v["variant"] for v in record["variants"]] == ["dense", "skip25/all"]
