"""Requeue after a failed srun step (slurm/common.sh -> `python -m skipgpt_dist.launch after-srun`): the
classification (preempted | infra | user) of exit codes and log snippets, the requeue rule (MAX_REQUEUES, progress
since the last infrastructure requeue) and RUN_DIR/requeues.log. Pure and fast: no Slurm, no torch.distributed.
The real-cluster checks (a rank SIGKILLed mid-run is requeued and resumes; a bad-config job is not) are in
tests/test_slurm.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skipgpt_dist import launch

REPO = Path(__file__).resolve().parents[1]

# Trimmed from real runs: torchrun (torch 2.13, gloo) with rank 1 SIGKILLed / raising ValueError in user code.
TORCHRUN_RANK_KILLED = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "/tmp/rq/w.py", line 11, in <module>
[rank0]:     dist.all_reduce(t)
[rank0]:   File "/usr/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 3252, in all_reduce
[rank0]:     work.wait()
[rank0]: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by \
peer [127.0.0.1]:48801. This is typically caused by a remote worker crashing.
W1205 20:12:38.828000 6094 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 6197 \
closing signal SIGTERM
E1205 20:12:38.860000 6094 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed \
(exitcode: -9) local_rank: 1 (pid: 6198) of binary: /usr/bin/python
[skipgpt launcher] ranks exited with [-15, -9]: launcher exits 137
"""
TORCHRUN_SUMMARY_KILLED = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 6198)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 6198
"""
TORCHRUN_USER_EXCEPTION = """\
[rank1]: Traceback (most recent call last):
[rank1]:   File "/tmp/rq/w.py", line 10, in <module>
[rank1]:     if mode == "raise": raise ValueError("bad value in user code")
[rank1]: ValueError: bad value in user code
[rank0]: Traceback (most recent call last):
[rank0]:   File "/usr/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 3252, in all_reduce
[rank0]:     work.wait()
[rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:8610.
E1205 20:12:43.672000 6214 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed \
(exitcode: 1) local_rank: 1 (pid: 6263) of binary: /usr/bin/python
[skipgpt launcher] ranks exited with [-15, 1]: launcher exits 1
"""
NCCL_ERROR = """\
[rank3]: Traceback (most recent call last):
[rank3]:   File "train.py", line 40, in main
[rank3]: torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, \
unhandled system error (run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5
[skipgpt launcher] ranks exited with [1]: launcher exits 1
"""
NCCL_WATCHDOG = """\
[rank7]:[E1205 10:00:00.000 ProcessGroupNCCL.cpp:616] [Rank 7] Watchdog caught collective operation timeout: \
WorkNCCL(SeqNum=5012, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600041 milliseconds \
before timing out.
[skipgpt launcher] ranks exited with [-6]: launcher exits 134
"""
DIST_NETWORK = """\
[rank0]: Traceback (most recent call last):
[rank0]: torch.distributed.DistNetworkError: failed to recv, got 0 bytes: Connection reset by peer
"""
SRUN_NODE_FAILURE = "srun: error: Node failure on gpu-node-17\nsrun: Job step aborted\n"
SLURMSTEPD_OOM = ("slurmstepd: error: Detected 1 oom_kill event in StepId=4711.0. Some of the step tasks have been "
                  "OOM Killed.\nsrun: error: n2: task 1: Out Of Memory\n")
BAD_CONFIG = "error: unknown config key optim.max_stpes: did you mean optim.max_steps?\n"
CUDA_OOM = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "train.py", line 40, in main
[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.
"""

CLASSIFY_CASES = {
    # name: (srun exit code, log of the step, stop signal, expected kind)
    "preempted_exit_75": (75, "", None, "preempted"),
    "killed_after_usr1": (138, "", "USR1", "preempted"),
    "rank_sigkilled": (137, TORCHRUN_RANK_KILLED, None, "infra"),
    "torchrun_summary_minus_9": (1, TORCHRUN_SUMMARY_KILLED, None, "infra"),
    "sigkill_no_log": (137, "", None, "infra"),                 # the OOM killer took the launcher itself
    "sigbus_no_log": (135, "", None, "infra"),
    "nccl_error": (1, NCCL_ERROR, None, "infra"),
    "nccl_watchdog_abort": (134, NCCL_WATCHDOG, None, "infra"),
    "dist_network_error": (1, DIST_NETWORK, None, "infra"),
    "srun_node_failure": (1, SRUN_NODE_FAILURE, None, "infra"),
    "slurmstepd_oom_kill": (137, SLURMSTEPD_OOM, None, "infra"),
    "bad_config_exit_2": (2, BAD_CONFIG, None, "user"),
    "exit_2_without_log": (2, "", None, "user"),
    "user_exception_peers_lose_connection": (1, TORCHRUN_USER_EXCEPTION, None, "user"),
    "user_exception_then_peer_killed": (137, TORCHRUN_USER_EXCEPTION + TORCHRUN_RANK_KILLED, None, "user"),
    "cuda_oom_is_the_jobs_own": (1, CUDA_OOM, None, "user"),
    "exit_1_without_log": (1, "", None, "user"),
    "segfault_without_evidence": (139, "", None, "user"),
    "failed_after_usr1": (1, "", "USR1", "user"),
    "bad_config_after_usr1": (2, BAD_CONFIG, "USR1", "user"),
}


@pytest.mark.parametrize("name", list(CLASSIFY_CASES))
def test_classify_failure(name):
    rc, log, stop, want = CLASSIFY_CASES[name]
    kind, reason = launch.classify_failure(rc, log, stop)
    assert kind == want, (kind, reason)
    assert reason and "\n" not in reason


def test_classify_failure_names_the_evidence():
    assert "SIGKILL" in launch.classify_failure(137, TORCHRUN_RANK_KILLED)[1]
    assert launch.classify_failure(1, TORCHRUN_USER_EXCEPTION)[1] == "ValueError: bad value in user code"
    assert launch.classify_failure(2, BAD_CONFIG)[1].startswith("error: unknown config key")
    assert "Watchdog" in launch.classify_failure(134, NCCL_WATCHDOG)[1]


DECISION_CASES = {
    # name: (kind, restarts, max_requeues, newest checkpoint step, last infra requeue's step, want requeue)
    "user_never": ("user", 0, 20, 100, False, False),
    "preempted": ("preempted", 3, 20, 100, False, True),
    "preempted_cap": ("preempted", 20, 20, 100, False, False),
    "infra_first_with_checkpoint": ("infra", 0, 20, 10, False, True),
    "infra_first_without_checkpoint": ("infra", 0, 20, None, False, True),   # starts over once
    "infra_again_after_progress": ("infra", 1, 20, 20, 10, True),
    "infra_again_first_checkpoint": ("infra", 1, 20, 10, None, True),
    "infra_again_no_progress": ("infra", 1, 20, 10, 10, False),
    "infra_again_still_no_checkpoint": ("infra", 1, 20, None, None, False),
    "infra_cap": ("infra", 5, 5, 50, 40, False),
}


@pytest.mark.parametrize("name", list(DECISION_CASES))
def test_requeue_decision(name):
    kind, restarts, cap, step, last, want = DECISION_CASES[name]
    requeue, why = launch.requeue_decision(kind, restarts, cap, step, last)
    assert requeue is want, why


def _checkpoint(run_dir: Path, step: int, complete: bool = True) -> None:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "complete": complete}))


def _after_srun(capsys, *args) -> str:
    assert launch.main(["after-srun", *args]) == 0
    return capsys.readouterr().out.strip()


def test_after_srun_reads_only_this_step_and_logs_each_decision(tmp_path, capsys):
    run_dir = tmp_path / "stage1"
    _checkpoint(run_dir, 10)
    _checkpoint(run_dir, 20, complete=False)  # an interrupted save: not resumable, not progress
    assert launch.latest_checkpoint_step(run_dir) == 10
    log = tmp_path / "job.out"
    earlier = TORCHRUN_USER_EXCEPTION  # an earlier run of the job (--open-mode=append): not this step's
    log.write_text(earlier + TORCHRUN_RANK_KILLED)
    common = ["--run-dir", str(run_dir), "--job-id", "42", "--max-requeues", "3", "--log", str(log)]
    out = _after_srun(capsys, "--rc", "137", "--restarts", "0", "--log-offset", str(len(earlier)), *common)
    assert out.startswith("requeue infra ") and "SIGKILL" in out
    # the whole log: the earlier user exception wins
    assert _after_srun(capsys, "--rc", "137", "--restarts", "0", *common).startswith("exit user ValueError")
    # the same fault again without a new checkpoint: stop
    out = _after_srun(capsys, "--rc", "137", "--restarts", "1", "--log-offset", str(len(earlier)), *common)
    assert out.startswith("exit infra ") and "no new checkpoint" in out
    _checkpoint(run_dir, 30)
    out = _after_srun(capsys, "--rc", "137", "--restarts", "1", "--log-offset", str(len(earlier)), *common)
    assert out.startswith("requeue infra ")
    out = _after_srun(capsys, "--rc", "137", "--restarts", "3", "--log-offset", str(len(earlier)), *common)
    assert out.startswith("exit infra ") and "MAX_REQUEUES=3" in out
    rows = (run_dir / "requeues.log").read_text().splitlines()
    assert len(rows) == 5
    fields = dict(item.split("=", 1) for item in rows[0].split() if "=" in item and not item.startswith("reason"))
    assert fields["job"] == "42" and fields["action"] == "requeue" and fields["kind"] == "infra"
    assert fields["srun_exit"] == "137" and fields["rank_exits"] == "-15,-9" and fields["checkpoint_step"] == "10"
    assert "reason='a rank was killed by SIGKILL" in rows[0]
    assert [r.split(" action=")[1].split()[0] for r in rows] == ["requeue", "exit", "exit", "requeue", "exit"]
    # another job (a resubmission) starts with a clean slate
    out = _after_srun(capsys, "--rc", "137", "--restarts", "0", "--log-offset", str(len(earlier)),
                      *common[:3], "43", *common[4:])
    assert out.startswith("requeue infra ")


def test_after_srun_without_log_or_run_folder(capsys, tmp_path):
    assert _after_srun(capsys, "--rc", "137", "--run-dir", str(tmp_path / "missing"),
                       "--log", str(tmp_path / "no.log")).startswith("requeue infra ")
    assert _after_srun(capsys, "--rc", "1").startswith("exit user ")


def _bash_decision(tmp_path, rc, log_text, restarts=0, usr1=0):
    """slurm/common.sh's skipgpt_requeue_or_exit with a job log and a stub scontrol."""
    stub = tmp_path / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    stub.chmod(0o755)
    run_dir = tmp_path / "stage1"
    if not run_dir.exists():
        _checkpoint(run_dir, 10)
    log = tmp_path / "job.out"
    log.write_text("output of an earlier run\nValueError: not this step's\n" + log_text)
    offset = len("output of an earlier run\nValueError: not this step's\n")
    script = (f"source {REPO}/slurm/common.sh; SLURM_JOB_ID=7 SLURM_RESTART_COUNT={restarts} MAX_REQUEUES=20 "
              f"RUN_DIR={run_dir} GOT_USR1={usr1} GOT_TERM=0 JOB_LOG={log} LOG_OFFSET={offset}; "
              f"skipgpt_requeue_or_exit {rc}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path}:{os.environ['PATH']}", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    return proc, calls


def test_batch_script_requeues_an_infrastructure_failure_once_per_checkpoint(tmp_path):
    proc, calls = _bash_decision(tmp_path, 137, TORCHRUN_RANK_KILLED)
    assert proc.returncode == 0 and calls == "requeue 7\n", proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "infrastructure failure (exit 137)" in line]
    assert len(lines) == 1 and "SIGKILL" in lines[0] and "restart 1 of at most 20" in lines[0], proc.stdout
    assert not proc.stderr.strip()
    # the run failed again at the same checkpoint: not requeued, one error line
    proc, calls = _bash_decision(tmp_path, 137, TORCHRUN_RANK_KILLED, restarts=1)
    assert proc.returncode == 137 and calls == "requeue 7\n"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "infrastructure fault" in errors[0] and "no new checkpoint" in errors[0]
    assert len((tmp_path / "stage1" / "requeues.log").read_text().splitlines()) == 2


@pytest.mark.parametrize("rc,log", [(2, BAD_CONFIG), (1, TORCHRUN_USER_EXCEPTION)], ids=["bad_config", "exception"])
def test_batch_script_never_requeues_the_jobs_own_error(tmp_path, rc, log):
    proc, calls = _bash_decision(tmp_path, rc, log)
    assert proc.returncode == rc and calls == "", proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not requeued" in errors[0], proc.stderr
    assert "action=exit kind=user" in (tmp_path / "stage1" / "requeues.log").read_text()


@pytest.mark.parametrize("script", ["slurm/stage1_13b.sh", "slurm/stage1_70b.sh", "slurm/stage2_70b.sh",
                                    "slurm/merge.sh"])
def test_batch_scripts_let_slurm_requeue_them(script):
    """#SBATCH --requeue: Slurm itself requeues the job when a node fails (NODE_FAIL), and `scontrol requeue`
    from the script is allowed whatever the cluster's JobRequeue default."""
    text = (REPO / script).read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text
