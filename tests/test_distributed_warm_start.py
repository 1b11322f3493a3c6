"""Router starts on the sharded model: the block-influence warm start (stage 1) and stage.calibrate (stage 2) run
inside the job on every rank of FSDP2 and ZeRO-3 and give what one process gives; tools/eval_ppl.py and
tools/calibrate_routers.py under torchrun print (and write) what one process does.

Real `torchrun --standalone` runs on gloo with the tiny builtin model (tests/dist_helpers.py). Two ranks with
micro_batch_size 2 against one process with 4: the same global batch, so the same calibration sequences (the
global stream's next ones). Every run checkpoints every step, so the routers after step 1 show that the optimiser
stepped the warm-started values (a ZeRO-3 fp32 master left at the old bias would undo the warm start there).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import REPO, child_env, tiny_run_overrides, train, zero3_all_sharded  # noqa: E402

ATOL_LOSS = 1e-4
ATOL_VALUES = 1e-5
STEPS = 3
PER_RANK = ["optim.micro_batch_size=2"]
ONE_PROCESS = ["optim.micro_batch_size=4"]
WARM_START = ["routers.init=block_influence", "routers.init_margin=3", "routers.init_skip_margin=-1"]
# Stage 2 with frozen routers: the routers every checkpoint holds are the calibrated ones, untouched by training.
CALIBRATE = ["stage.stage=2", "stage.lora.r=4", "stage.lora.alpha=8", "stage.lora.dropout=0", "optim.lr=2e-3",
             "stage.calibrate.enabled=true", "stage.calibrate.sparsity=0.3"]
BACKENDS = ["fsdp2", "zero3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist_warm_start")


@pytest.fixture(scope="module")
def common(root, tiny_model_dir) -> list[str]:
    return tiny_run_overrides(root, tiny_model_dir, STEPS) + ["checkpoint.every_steps=1",
                                                               f"checkpoint.keep_last={STEPS}"]


def ok(run):
    assert run.returncode == 0, run.output[-4000:]
    assert len(run.metrics()) == STEPS, run.output[-4000:]
    return run


def run_backend(root, name, overrides, backend):
    """2 ranks of `backend` (fsdp2, or zero3 with every parameter partitioned)."""
    if backend == "fsdp2":
        return ok(train(root / name, overrides + PER_RANK + ["parallel.backend=fsdp2"]))
    return ok(train(root / name, overrides + PER_RANK, ds_config=zero3_all_sharded(root)))


@pytest.fixture(scope="module")
def ref_warm(root, common):
    """One process, warm-started; also the stage-1 checkpoint the calibration runs start from."""
    return ok(train(root / "ref_warm", common + WARM_START + ONE_PROCESS, launcher="python", nproc=1))


@pytest.fixture(scope="module")
def calibrate(ref_warm, common) -> list[str]:
    return common + CALIBRATE + [f"stage.init_from={ref_warm.run_dir}"]


@pytest.fixture(scope="module")
def ref_calibrated(root, calibrate):
    return ok(train(root / "ref_cal", calibrate + ONE_PROCESS, launcher="python", nproc=1))


def routers_at(run, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run.run_dir / "checkpoints" / f"step_{step:08d}" / "routers.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def influence(run) -> dict:
    return json.loads((run.run_dir / "block_influence.json").read_text())


def assert_same_losses(run, ref):
    for key in ("loss", "lm_loss"):
        got, want = run.trajectory(key), ref.trajectory(key)
        assert len(got) == len(want) == STEPS
        assert max(abs(g - w) for g, w in zip(got, want)) <= ATOL_LOSS, (key, got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_start_on_two_ranks_matches_one_process(backend, root, common, ref_warm):
    run = run_backend(root, f"warm_{backend}", common + WARM_START, backend)
    assert "routers warm-started from block influence" in run.output
    got, want = influence(run), influence(ref_warm)
    assert got["marked"] == want["marked"] and want["marked"]["attn"] + want["marked"]["mlp"]
    for kind in ("layer", "attn", "mlp"):
        assert max(abs(g - w) for g, w in zip(got[kind], want[kind])) <= ATOL_VALUES, (kind, got, want)
    assert_same_losses(run, ref_warm)
    for step in (1, STEPS):  # after the first update: the optimiser stepped the warm-started biases
        assert max_diff(routers_at(run, step), routers_at(ref_warm, step)) <= ATOL_VALUES, step


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_job_calibration_on_two_ranks_matches_one_process(backend, root, calibrate, ref_calibrated, ref_warm):
    run = run_backend(root, f"cal_{backend}", calibrate, backend)
    line = next(x for x in run.output.splitlines() if "routers calibrated" in x)
    assert line in ref_calibrated.output  # the same before/after skip rates
    calibrated = routers_at(ref_calibrated, STEPS)
    assert max_diff(routers_at(run, STEPS), calibrated) <= ATOL_VALUES
    assert max_diff(calibrated, routers_at(ref_warm, STEPS)) > 1e-2  # calibration moved the stage-1 routers
    assert_same_losses(run, ref_calibrated)


def test_resumed_run_keeps_its_routers_and_capacity_plan_without_a_second_warm_start(root, common):
    """Stopped after step 1 and resumed: no warm start over the loaded routers (the resumed data position would
    rank other sequences), the warm start's capacity plan back from the checkpoint, the uninterrupted trajectory."""
    overrides = common + WARM_START + ONE_PROCESS + ["routers.capacity_plan=warm_start",
                                                     "routers.marked_capacity=0.5"]
    whole = ok(train(root / "plan_whole", overrides, launcher="python", nproc=1))
    assert "capacity plan" in whole.output
    first = train(root / "plan_resumed", overrides + ["optim.stop_at_step=1"], launcher="python", nproc=1)
    assert first.returncode == 0, first.output[-3000:]
    resumed = ok(train(root / "plan_resumed", overrides, launcher="python", nproc=1))
    assert "resumed from" in resumed.output and "warm-started" not in resumed.output
    assert_same_losses(resumed, whole)
    assert max_diff(routers_at(resumed, STEPS), routers_at(whole, STEPS)) <= ATOL_VALUES


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def tool_line(prefix: list[str], tool: str, args: list[str]) -> dict:
    """The one JSON line tools/TOOL.py prints, run as `prefix` (one process, or torchrun) says."""
    proc = subprocess.run(prefix + [str(REPO / "tools" / tool), *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 prints
    return json.loads(lines[0])


def eval_ppl(prefix: list[str], run, data: list[str]) -> dict:
    return tool_line(prefix, "eval_ppl.py", [str(run.run_dir), "--data", *data, "--sequences", "5",
                                             "--batch-size", "2"])


def test_eval_ppl_under_torchrun_equals_one_process(ref_calibrated, common):
    """5 sequences on 2 ranks: rank 1 scores one padding duplicate that must not count."""
    data = json.loads(next(x for x in common if x.startswith("data.train_files="))[len("data.train_files="):])
    one = eval_ppl([sys.executable], ref_calibrated, data)
    two = eval_ppl(TORCHRUN_2, ref_calibrated, data)
    assert set(one) == set(two) and one["sequences"] == 5
    for key in ("ppl_routed", "ppl_dense", "ppl_ratio", "attn_sparsity", "mlp_sparsity", "sparsity"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-7), key


def calibrate_tool(prefix: list[str], run, out: Path) -> dict:
    return tool_line(prefix, "calibrate_routers.py", [str(run.run_dir), "--out", str(out), "--sparsity", "0.3",
                                                      "--sequences", "5"])


def test_calibrate_tool_under_torchrun_equals_one_process(root, ref_warm):
    """5 calibration sequences on 2 ranks (rank 1 runs a padding duplicate that must not count): every rank gets
    the one-process shifts, rank 0 writes the same routers, and the held-out line is the same."""
    from safetensors.torch import load_file

    one = calibrate_tool([sys.executable], ref_warm, root / "tool_cal_one")
    two = calibrate_tool(TORCHRUN_2, ref_warm, root / "tool_cal_two")
    for kind in ("attn", "mlp"):
        assert two["skip_rate_before"][kind] == pytest.approx(one["skip_rate_before"][kind], abs=1e-7), kind
    for key in ("ppl_routed", "ppl_dense", "attn_sparsity", "mlp_sparsity", "sparsity"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-7), key
    written = {name: load_file(str(root / name / "routers.safetensors")) for name in ("tool_cal_one", "tool_cal_two")}
    assert max_diff(written["tool_cal_two"], written["tool_cal_one"]) <= ATOL_VALUES
    assert max_diff(written["tool_cal_one"], routers_at(ref_warm, STEPS)) > 1e-2  # calibration moved the routers
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".tool_cal")) == []  # no temporary folder left
