"""Slurm: slurm/*.sh and skipgpt_dist.launch on a real 2-node Slurm 22.05 cluster (tests/slurm/start.sh).

The long jobs (three 2-node trainings: uninterrupted, preempted, a rank SIGKILLed; a 1-node job failing on its
own error; the pipeline, submitit) are all submitted at once by one module fixture,
so they share the cluster's queue while the tests check them one by one; the emulated nodes declare 8 CPUs each
so nothing waits for a slot. Each job writes to its own fresh output folder. The whole file takes ~2.5 minutes on
2 idle cores (~4 under load); `-m "not slow"` leaves the ~20 s of quick checks. Without Slurm and without a way to
install it (tests/slurm/install.sh: root + apt), the cluster tests skip.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from skipgpt_dist import launch
from skipgpt_dist.training.loop import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPTS = REPO / "tests" / "slurm"
PYTHON = sys.executable
MAX_STEPS = 20          # the preempted run and its uninterrupted reference (checkpoints every 10)
SIGNAL_AT_STEP = 3      # USR1 once metrics.jsonl has this many steps
TEST_SBATCH = ["--gpus-per-node", "0", "--oversubscribe", "--time", "10"]  # over the 8-GPU / --exclusive defaults
FINISHED = launch.FINISHED_STATES


# ---------------------------------------------------------------- cluster


def _clean_env(extra: dict | None = None) -> dict:
    """This process's environment without any Slurm job or torch.distributed variables (CI may itself run
    inside a Slurm job), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("SLURM_") or k.startswith("SBATCH_") or k.startswith("SRUN_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHON=PYTHON, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.update(extra or {})
    return env


def _running_root() -> str | None:
    """The SLURM_ROOT of a cluster tests/slurm/start.sh already runs here (it links /etc/slurm/slurm.conf)."""
    link = Path("/etc/slurm/slurm.conf")
    if not link.is_symlink():
        return None
    root = Path(os.readlink(link)).parent.parent
    pid_file = root / "run" / "slurmctld.pid"
    try:
        comm = Path(f"/proc/{pid_file.read_text().strip()}/comm").read_text().strip()
    except OSError:
        return None
    return str(root) if comm == "slurmctld" else None


@pytest.fixture(scope="session")
def slurm_env():
    """Environment (SLURM_CONF) of a running 2-node cluster: reuses one started by tests/slurm/start.sh, else
    starts one in a fresh /tmp folder and stops it at the end of the session."""
    if not (shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged")):
        inst = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "install.sh")], capture_output=True, text=True)
        if inst.returncode != 0:
            pytest.skip(f"Slurm is not installed and tests/slurm/install.sh failed (needs root + apt): "
                        f"{(inst.stderr or inst.stdout).strip().splitlines()[-1:]}")
    root = os.environ.get("SKIPGPT_SLURM_ROOT") or _running_root()
    owned = root is None
    if owned:
        root = tempfile.mkdtemp(prefix="skipgpt-slurm-", dir="/tmp")
    env = _clean_env({"SLURM_ROOT": root, "SLURM_NODES": "2", "SLURM_CPUS_PER_NODE": "8", "SLURM_WITH_DBD": "0"})
    start = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "start.sh")], env=env, capture_output=True, text=True)
    if start.returncode != 0:
        pytest.fail(f"tests/slurm/start.sh failed:\n{start.stderr[-3000:]}")
    env = _clean_env({"SLURM_CONF": f"{root}/etc/slurm.conf"})
    yield env
    if owned:
        subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop.sh")], env={**env, "SLURM_ROOT": root},
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def job_info(env, job_id) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=env, capture_output=True, text=True)
    return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)


def wait_job(env, job_id, timeout=300) -> dict:
    """Poll until the job has finished for good (a requeued job is PENDING again in between)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in FINISHED:
            return info
        time.sleep(1)
    subprocess.run(["scancel", str(job_id)], env=env)
    pytest.fail(f"job {job_id} did not finish within {timeout} s: {job_info(env, job_id)}")


def sbatch(env, script, *args, sbatch_args=(), **knobs) -> str:
    out_dir = Path(knobs.get("OUT", tempfile.gettempdir()))
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", "--output", f"{out_dir}/logs/%x-%j.out", *sbatch_args, str(REPO / script),
           *args]
    proc = subprocess.run(cmd, env={**env, **{k: str(v) for k, v in knobs.items()}}, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def log_of(out: Path, job_id) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((out / "logs").glob(f"*-{job_id}.out")))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def slurm_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


# ---------------------------------------------------------------- the tiny run


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """Knobs and overrides of a tiny CPU stage 1 (one gloo rank per node)."""
    from skipgpt_dist.assets import shakespeare_files

    overrides = [f"data.train_files=[{','.join(shakespeare_files('train')[:2])}]",
                 f"data.eval_files=[{shakespeare_files('eval')[0]}]", "data.seq_len=32", "data.eval_sequences=2",
                 "logging.progress=false"]
    knobs = {"CONFIG": "configs/tiny.yaml", "MODEL_PATH": tiny_model_dir, "GPUS_PER_NODE": "0", "PYTHON": PYTHON}
    return knobs, overrides


class Preempter(threading.Thread):
    """Sends `scancel --signal=USR1 --batch` (what --signal=B:USR1@N does) once the run has logged some steps."""

    def __init__(self, env, job_id, run_dir: Path):
        super().__init__(daemon=True)
        self.env, self.job_id, self.metrics = env, job_id, run_dir / "metrics.jsonl"
        self.signalled_after: int | None = None

    def run(self):
        deadline = time.time() + 240
        while time.time() < deadline:
            steps = self.metrics.read_text().count('"loss"') if self.metrics.is_file() else 0
            if steps >= SIGNAL_AT_STEP:
                subprocess.run(["scancel", "--signal=USR1", "--batch", self.job_id], env=self.env, check=True)
                self.signalled_after = steps
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def jobs(slurm_env, tiny, tmp_path_factory):
    """Submit every long job at once; the tests below wait for the ones they check."""
    knobs, overrides = tiny
    env = slurm_env
    two_nodes = ["--nodes", "2", *TEST_SBATCH]
    out = {name: tmp_path_factory.mktemp(name) for name in ("reference", "preempted", "pipeline",
                                                              "pipeline_fail", "submitit", "rank_killed",
                                                              "own_error")}
    steps = f"optim.max_steps={MAX_STEPS}"
    submitted = {"out": out}
    submitted["reference"] = sbatch(env, "slurm/stage1_70b.sh", *overrides, steps, sbatch_args=two_nodes,
                                    OUT=out["reference"], **knobs)
    submitted["preempted"] = sbatch(env, "slurm/stage1_70b.sh", *overrides, steps, sbatch_args=two_nodes,
                                    OUT=out["preempted"], **knobs)
    # a training rank SIGKILLed once the first checkpoint is complete (what the OOM killer or a lost node does)
    submitted["rank_killed"] = sbatch(env, "slurm/stage1_70b.sh", *overrides, steps, sbatch_args=two_nodes,
                                      OUT=out["rank_killed"], SKIPGPT_TEST_FAULT="kill_rank_after_checkpoint",
                                      **knobs)
    # train.py exits 2 with one line (a training file that passes preflight but holds no text): the job's own error
    blank = out["own_error"] / "blank.txt"
    blank.write_text("\n  \n")
    submitted["own_error"] = sbatch(env, "slurm/stage1_70b.sh", *overrides, steps, f"data.train_files=[{blank}]",
                                    sbatch_args=["--nodes", "1", *TEST_SBATCH], OUT=out["own_error"], **knobs)
    preempter = Preempter(env, submitted["preempted"], out["preempted"] / "stage1")
    preempter.start()
    submitted["preempter"] = preempter

    def pipeline(folder, **extra):
        extra_overrides = " ".join(overrides)
        proc = subprocess.run(
            ["bash", str(REPO / "slurm/pipeline.sh"), *TEST_SBATCH], cwd=REPO, capture_output=True, text=True,
            env={**env, "OUT": str(folder), "MODEL_PATH": knobs["MODEL_PATH"], "GPUS_PER_NODE": "0",
                 "PYTHON": PYTHON, "STAGE1_CONFIG": "configs/tiny.yaml", "STAGE2_CONFIG": "configs/tiny_stage2.yaml",
                 "EXTRA": extra_overrides, "STAGE1_EXTRA": "optim.max_steps=4", "STAGE2_EXTRA": "optim.max_steps=3",
                 "STAGE1_SBATCH": "--nodes 2", "STAGE2_SBATCH": "--nodes 2", **extra})
        assert proc.returncode == 0, proc.stderr
        return dict(line.split() for line in proc.stdout.splitlines())

    submitted["pipeline"] = pipeline(out["pipeline"])
    submitted["pipeline_fail"] = pipeline(out["pipeline_fail"], MODEL_PATH=str(out["pipeline_fail"] / "no-model"))
    submitted["submitit"] = subprocess.Popen(
        [PYTHON, "-m", "skipgpt_dist.launch", "--nodes", "2", "--config", "configs/tiny.yaml", "--output",
         str(out["submitit"]), "--time", "10", "--job-name", "skipgpt-submitit", "--wait",
         f"model.path={knobs['MODEL_PATH']}", *overrides, "optim.max_steps=4"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield submitted
    if submitted["submitit"].poll() is None:
        submitted["submitit"].kill()


def final_routers(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "routers.safetensors"))


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("script", ["slurm/stage1_13b.sh", "slurm/stage1_70b.sh", "slurm/stage2_70b.sh",
                                    "slurm/merge.sh"])
def test_batch_scripts_outside_slurm_are_a_one_line_error(script, tmp_path):
    proc = subprocess.run(["bash", str(REPO / script)], cwd=tmp_path, env=_clean_env(), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {script} is a Slurm batch script: submit it with `sbatch")


def test_launcher_exit_code_mapping():
    """Node launcher: 75 only when every failed rank stopped with a checkpoint (or was signalled after a stop
    request); otherwise the rank's own code (2 = a one-line user error) or 128 + signal."""
    assert launch.PREEMPTED_EXIT_CODE == PREEMPTED_EXIT_CODE
    assert launch._failure_exit_code([75, 75], stop_requested=False) == 75
    assert launch._failure_exit_code([75, -15], stop_requested=True) == 75
    assert launch._failure_exit_code([75, -15], stop_requested=False) == 128 + 15
    assert launch._failure_exit_code([2], stop_requested=True) == 2
    assert launch._failure_exit_code([1, 75], stop_requested=False) == 1


REQUEUE_CASES = {
    # name: (srun exit code, got USR1, got TERM, restarts so far, batch exit code, requeued)
    "finished": (0, 0, 0, 0, 0, False),
    "stopped_on_usr1": (75, 1, 0, 0, 0, True),
    "stopped_on_direct_usr1": (75, 0, 0, 3, 0, True),        # --signal=USR1@N without B: reaches the ranks only
    "killed_starting_after_usr1": (138, 1, 0, 0, 0, True),   # nothing trained yet: resume from the last one
    "stopped_on_term": (75, 0, 1, 0, 75, False),             # scancel / time limit: a cancel stays a cancel
    "failed_after_usr1": (1, 1, 0, 0, 1, False),
    "user_error": (2, 0, 0, 0, 2, False),
    "requeue_cap": (75, 1, 0, 20, 75, False),
}


@pytest.mark.parametrize("name", list(REQUEUE_CASES))
def test_batch_script_requeues_only_a_run_that_stopped_with_a_checkpoint(name, tmp_path):
    """slurm/common.sh's decision after srun, with a stub scontrol that records what it is asked."""
    rc, usr1, term, restarts, want_exit, want_requeue = REQUEUE_CASES[name]
    stub = tmp_path / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    stub.chmod(0o755)
    script = (f"source {REPO}/slurm/common.sh; SLURM_JOB_ID=7 SLURM_RESTART_COUNT={restarts} MAX_REQUEUES=20 "
              f"RUN_DIR=/runs/x GOT_USR1={usr1} GOT_TERM={term}; skipgpt_requeue_or_exit {rc}")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env=_clean_env({"PATH": f"{tmp_path}:{os.environ['PATH']}"}))
    assert proc.returncode == want_exit, proc.stdout + proc.stderr
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    assert calls == ("requeue 7\n" if want_requeue else ""), calls
    assert len(error_lines(proc.stderr)) == (1 if want_exit not in (0, 75) or name == "requeue_cap" else 0)


BAD_INPUTS = {
    # name: (knobs, sbatch options, extra overrides, expected start of the error line)
    "missing_config": ({"CONFIG": "configs/no_such.yaml"}, [], [], "error: CONFIG="),
    "missing_model": ({"MODEL_PATH": "/nonexistent/model"}, [], [],
                      "error: MODEL_PATH=/nonexistent/model is not a Hugging Face model folder"),
    "missing_stage1": ({"CONFIG": "configs/tiny_stage2.yaml", "INIT_FROM": "/nonexistent/stage1"}, [], [],
                       "error: stage.init_from='/nonexistent/stage1' does not exist"),
    "unknown_key": ({}, [], ["optim.max_stpes=3"], "error: unknown config key optim.max_stpes"),
    "nodes_mismatch": ({"NODES": "2"}, [], [], "error: this run expects NODES=2 nodes but the job has 1"),
    "gpus_missing": ({"GPUS_PER_NODE": "2"}, [], [], "error: GPUS_PER_NODE=2 but 0 GPU(s) are visible"),
}


@pytest.fixture(scope="module")
def bad_jobs(slurm_env, tiny, tmp_path_factory):
    """One 1-node job per bad input, all submitted at once; each run folder holds an earlier checkpoint."""
    knobs, overrides = tiny
    submitted = {}
    for name, (bad, sbatch_args, extra, _) in BAD_INPUTS.items():
        out = tmp_path_factory.mktemp(f"bad_{name}")
        stage = 2 if "tiny_stage2" in bad.get("CONFIG", "") else 1
        ckpt = out / f"stage{stage}" / "checkpoints" / "step_00000005"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text('{"step": 5, "complete": true}\n')
        before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
        script = "slurm/stage2_70b.sh" if stage == 2 else "slurm/stage1_70b.sh"
        job = sbatch(slurm_env, script, *overrides, *extra, sbatch_args=["--nodes", "1", *TEST_SBATCH,
                                                                           *sbatch_args],
                     OUT=out, **{**knobs, **bad})
        submitted[name] = (job, out, before)
    return submitted


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_fails_within_seconds_with_one_line(name, bad_jobs, slurm_env):
    job, out, before = bad_jobs[name]
    info = wait_job(slurm_env, job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    run_s = (slurm_time(info["EndTime"]) - slurm_time(info["StartTime"])).total_seconds()
    assert run_s <= 30, f"took {run_s} s"
    errors = error_lines(log_of(out, job))
    assert len(errors) == 1 and errors[0].startswith(BAD_INPUTS[name][3]), log_of(out, job)
    assert "[skipgpt launcher]" not in log_of(out, job) and info.get("Restarts") == "0"
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file() and "logs" not in
             p.parts}
    assert after == before, "an earlier checkpoint was touched"


@pytest.mark.slow
def test_two_nodes_join_one_process_group_and_write_a_checkpoint(jobs, slurm_env):
    out = jobs["out"]["reference"]
    info = wait_job(slurm_env, jobs["reference"])
    log = log_of(out, jobs["reference"])
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert re.search(r"\[skipgpt launcher\] node 0/2 \(n1\)", log) and re.search(r"node 1/2 \(n2\)", log), log
    assert "world size 2" in log and "backend fsdp2" in log
    assert len(re.findall(r"\[skipgpt rank [01]/2\]", log)) == 2
    checkpoint = out / "stage1" / "checkpoints" / f"step_{MAX_STEPS:08d}"
    assert (checkpoint / "routers.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()


@pytest.mark.slow
def test_preempted_job_requeues_and_ends_with_the_same_routers(jobs, slurm_env):
    out, job = jobs["out"]["preempted"], jobs["preempted"]
    info = wait_job(slurm_env, job)
    jobs["preempter"].join(timeout=5)
    log = log_of(out, job)
    assert jobs["preempter"].signalled_after is not None, "the run never reached the signal step"
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])
    assert "batch script got SIGUSR1" in log and "requeueing job" in log
    assert log.count("launcher exits 75 (stopped with a checkpoint)") == 2, log[-3000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and SIGNAL_AT_STEP <= int(resumed.group(1)) < MAX_STEPS, log[-3000:]
    rows = [line for line in (out / "stage1" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [int(re.search(r'"step": (\d+)', r).group(1)) for r in rows] == list(range(1, MAX_STEPS + 1))
    assert_same_routers_as_reference(jobs, slurm_env, out)


def assert_same_routers_as_reference(jobs, slurm_env, out):
    """The final routers of the run in `out` are bit-identical to those of the uninterrupted reference job."""
    wait_job(slurm_env, jobs["reference"])
    reference = final_routers(jobs["out"]["reference"] / "stage1", MAX_STEPS)
    resumed_routers = final_routers(out / "stage1", MAX_STEPS)
    assert reference.keys() == resumed_routers.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed_routers[name]), name


@pytest.mark.slow
def test_rank_killed_mid_run_is_requeued_and_ends_with_the_same_routers(jobs, slurm_env):
    """An infrastructure failure (a rank SIGKILLed after the first checkpoint): the script requeues the job, logs
    why (job log + run_dir/requeues.log), the rerun resumes from the checkpoint and ends as an uninterrupted run."""
    out, job = jobs["out"]["rank_killed"], jobs["rank_killed"]
    info = wait_job(slurm_env, job)
    log = log_of(out, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])
    assert "test fault: SIGKILL to training rank" in log, log[-3000:]
    reasons = [line for line in log.splitlines() if "infrastructure failure (exit" in line]
    assert len(reasons) == 1 and "requeueing job" in reasons[0], log[-3000:]
    rows = (out / "stage1" / "requeues.log").read_text().splitlines()
    assert len(rows) == 1 and f"job={job} restart=0 action=requeue kind=infra" in rows[0], rows
    assert "checkpoint_step=none" not in rows[0], rows
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < MAX_STEPS, log[-3000:]
    assert_same_routers_as_reference(jobs, slurm_env, out)


@pytest.mark.slow
def test_job_failing_on_its_own_error_is_not_requeued(jobs, slurm_env):
    out, job = jobs["out"]["own_error"], jobs["own_error"]
    info = wait_job(slurm_env, job, timeout=180)
    log = log_of(out, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info, log[-3000:])
    errors = error_lines(log)  # train.py's one line, then the script's
    assert len(errors) == 2 and "holds no text" in errors[0], log[-3000:]
    assert errors[1].startswith("error: training failed with exit code 2") and "not requeued" in errors[1]
    assert "requeueing job" not in log
    rows = (out / "stage1" / "requeues.log").read_text().splitlines()
    assert len(rows) == 1 and "action=exit kind=user srun_exit=2" in rows[0], rows


@pytest.mark.slow
def test_pipeline_runs_stage1_then_stage2_then_merge(jobs, slurm_env):
    out, ids = jobs["out"]["pipeline"], jobs["pipeline"]
    infos = {name: wait_job(slurm_env, ids[name]) for name in ("stage1", "stage2", "merge")}
    logs = {name: log_of(out, ids[name]) for name in ids}
    for name, info in infos.items():
        assert info["JobState"] == "COMPLETED", (name, logs[name][-3000:])
    assert slurm_time(infos["stage2"]["StartTime"]) >= slurm_time(infos["stage1"]["EndTime"])
    assert slurm_time(infos["merge"]["StartTime"]) >= slurm_time(infos["stage2"]["EndTime"])
    stage2_config = yaml.safe_load((out / "stage2" / "config.yaml").read_text())
    assert stage2_config["stage"]["init_from"] == f"{out}/stage1" and "stage 2 on" in logs["stage2"]
    adapter = load_file(str(out / "stage2" / "checkpoints" / "step_00000003" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "routers.safetensors").is_file()
    assert f"+ {out}/stage2 -> {out}/merged" in logs["merge"]


@pytest.mark.slow
def test_pipeline_stage1_failure_cancels_stage2_and_merge(jobs, slurm_env):
    out, ids = jobs["out"]["pipeline_fail"], jobs["pipeline_fail"]
    stage1 = wait_job(slurm_env, ids["stage1"], timeout=120)
    assert stage1["JobState"] == "FAILED" and len(error_lines(log_of(out, ids["stage1"]))) == 1
    for name in ("stage2", "merge"):
        info = wait_job(slurm_env, ids[name], timeout=120)
        assert info["JobState"] == "CANCELLED" and "Dependency" in info.get("Reason", ""), (name, info)
    assert not (out / "stage2").exists() and not (out / "merged").exists()


@pytest.mark.slow
def test_submitit_path_runs_a_tiny_stage1_on_two_nodes(jobs):
    proc, out = jobs["submitit"], jobs["out"]["submitit"]
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("python -m skipgpt_dist.launch --wait did not return within 300 s")
    assert proc.returncode == 0, output[-3000:]
    job_id = re.search(r"submitted job (\d+)", output).group(1)
    assert f"job {job_id} completed" in output
    logs = "".join(p.read_text() for p in (out / "logs" / "submitit" / job_id).glob("*_log.*"))
    assert "node 0/2 (n1)" in logs and "node 1/2 (n2)" in logs and "world size 2" in logs, logs[-3000:]
    for task in (0, 1):
        with open(out / "logs" / "submitit" / job_id / f"{job_id}_{task}_result.pkl", "rb") as fh:
            status, value = pickle.load(fh)
        assert status == "success" and value == {"node": task, "returncode": 0}
    assert (out / "stage1" / "checkpoints" / "step_00000004" / "routers.safetensors").is_file()


def test_submit_checks_inputs_before_queueing(tmp_path, capsys):
    """A bad input is one line and exit 2 at submit time; nothing is queued (no Slurm needed)."""
    with pytest.raises(SystemExit) as exc:
        launch.main(["--nodes", "2", "--config", "configs/tiny.yaml", "--output", str(tmp_path),
                     "model.path=/nonexistent/model"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [err.strip()] and "model.path=/nonexistent/model" in err
    with pytest.raises(SystemExit) as exc:
        launch.main(["--nodes", "2", "--backend", "none", "--config", "configs/tiny.yaml", "--output",
                     str(tmp_path)])
    assert exc.value.code == 2 and "parallel.backend=none cannot run on 2 ranks" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
