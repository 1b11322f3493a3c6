"""Submitting a training run to Slurm through submitit (`submit()`, the Python API behind `python -m
skipgpt_dist.launch`): the allocation, the task every node runs (one node launcher), and waiting for the job
without Slurm's accounting database."""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SkipGPTError
from .node_launcher import (PREEMPTED_EXIT_CODE, TRAIN_PY, log, node_environment, rendezvous_port, slurm_hostnames,
                            torchrun, torchrun_args)
from .preflight import load_run_config, preflight


@dataclass
class NodeTask:
    """What a submitit job runs on each of its nodes: one launcher (torchrun agent) for that node's ranks.
    On exit code 75 (stopped with a checkpoint on the job's USR1) node 0 requeues the job, like slurm/common.sh."""

    train_args: list[str]
    gpus_per_node: int = 0
    cpu_ranks_per_node: int = 1
    max_requeues: int = 20

    def __call__(self) -> dict:
        job_id = os.environ["SLURM_JOB_ID"]
        nnodes, node = int(os.environ["SLURM_NNODES"]), int(os.environ.get("SLURM_NODEID", "0"))
        host = slurm_hostnames()[0]
        os.environ.update(node_environment(self.gpus_per_node))
        nproc = self.gpus_per_node or self.cpu_ranks_per_node
        argv = [*torchrun_args(nnodes, nproc, host, rendezvous_port(job_id), job_id), str(TRAIN_PY),
                *self.train_args]
        code = torchrun(argv)
        if code == PREEMPTED_EXIT_CODE:
            self._requeue(job_id, node)
        if code != 0:
            raise SkipGPTError(f"training on node {node} exited with code {code}: see this job's log")
        return {"node": node, "returncode": 0}

    def _requeue(self, job_id: str, node: int) -> None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            raise SkipGPTError(f"stopped with a checkpoint but already requeued {restarts} times "
                               f"(max_requeues={self.max_requeues}): submit again to continue from it")
        if node == 0:
            log(f"checkpoint saved on a stop signal: requeueing job {job_id} (restart {restarts + 1})")
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        # Slurm now ends this run (returning would write a result and mark the job done); other nodes give
        # node 0 a while to requeue it
        deadline = time.time() + (float("inf") if node == 0 else 300)
        while time.time() < deadline:
            time.sleep(5)
        raise SkipGPTError("stopped with a checkpoint, but the job was not requeued by node 0: see its log")


@dataclass
class SlurmOptions:
    """Allocation of one submitted job (sbatch's options of the same names)."""

    nodes: int = 1
    gpus_per_node: int = 0          # 0: CPU ranks (gloo)
    cpu_ranks_per_node: int = 1     # ranks per node when gpus_per_node == 0
    partition: str | None = None
    time_min: int = 60
    cpus_per_node: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    exclusive: bool = False
    job_name: str = "skipgpt"
    signal_delay_s: int = 300       # USR1 this long before the time limit: checkpoint, requeue
    max_requeues: int = 20
    additional: dict = field(default_factory=dict)  # any other sbatch option, e.g. {"constraint": "h100"}


def _executor(folder: Path, opts: SlurmOptions):
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    extra = {"signal": f"USR1@{opts.signal_delay_s}", "requeue": True, **opts.additional}
    if opts.exclusive:
        extra["exclusive"] = True
    params = dict(nodes=opts.nodes, tasks_per_node=1, timeout_min=opts.time_min, name=opts.job_name,
                  slurm_partition=opts.partition, slurm_mem=opts.mem, slurm_account=opts.account,
                  slurm_qos=opts.qos, cpus_per_task=opts.cpus_per_node, slurm_additional_parameters=extra)
    if opts.gpus_per_node > 0:
        params["gpus_per_node"] = opts.gpus_per_node
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def submit(config: str | None, overrides=(), *, output: str | None = None, backend: str = "fsdp2",
           ds_config: str | None = None, slurm: SlurmOptions | None = None):
    """Submit one training run; returns the submitit Job. The run folder is OUTPUT/stage<N> (a `run_dir=`
    override wins), submitit's logs go to OUTPUT/logs/submitit/<job id>/; OUTPUT defaults to runs/<job name>.
    The inputs are checked here, before anything is queued."""
    opts = slurm or SlurmOptions()
    if not TRAIN_PY.is_file():
        raise SkipGPTError(f"{TRAIN_PY} not found: skipgpt_dist.launch needs the repository checkout "
                           "(pip install -e .)")
    config = os.path.abspath(config) if config else None
    ds_config = os.path.abspath(ds_config) if ds_config else None
    out = Path(os.path.abspath(output or os.path.join("runs", opts.job_name)))
    backend_arg = [f"parallel.backend={'deepspeed' if ds_config else backend}"]
    stage = load_run_config(config, [*backend_arg, *overrides], ds_config).stage.stage
    overrides = [*backend_arg, f"run_dir={out / f'stage{stage}'}", *overrides]
    cfg = load_run_config(config, overrides, ds_config)
    preflight(cfg, opts.nodes * (opts.gpus_per_node or opts.cpu_ranks_per_node))
    train_args = (["--config", config] if config else []) + (["--ds_config", ds_config] if ds_config else [])
    task = NodeTask([*train_args, *overrides], opts.gpus_per_node, opts.cpu_ranks_per_node, opts.max_requeues)
    return _executor(out / "logs" / "submitit", opts).submit(task)


FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED")


def slurm_job_state(job_id: str) -> str | None:
    """JobState from `scontrol show job` (no accounting database needed), or None once Slurm forgot the job."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    for item in out.stdout.split():
        if item.startswith("JobState="):
            return item.split("=", 1)[1]
    return None


def wait_for(job, poll_s: float = 2.0) -> None:
    """Until the job has written its results or Slurm reports it finished (submitit alone would poll sacct,
    which clusters without slurmdbd lack). A requeued job is PENDING again, so it is waited for."""
    import logging

    logging.getLogger("submitit").setLevel(logging.ERROR)  # its sacct fallbacks are noise here
    while not job.done():
        state = slurm_job_state(job.job_id)
        if state is None or state.split()[0] in FINISHED_STATES:
            time.sleep(poll_s)  # let the result files of the last task land
            return
        time.sleep(poll_s)
