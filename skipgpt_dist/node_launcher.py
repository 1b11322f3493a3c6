"""One launcher per node: the rendezvous every node computes the same way (as slurm/common.sh does), the node's
environment, and torchrun (the same arguments, the same elastic agent) that passes the ranks' exit code 75 through
(a checkpoint was saved on a stop signal: requeue and resume) and leaves SIGUSR1 / SIGTERM to the ranks.
Imports no torch at module level: the batch script runs pieces of it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .errors import SkipGPTError

PREEMPTED_EXIT_CODE = 75  # == training.loop.PREEMPTED_EXIT_CODE (not imported: that pulls in the whole stack)
REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def log(msg: str) -> None:
    print(f"[skipgpt launcher] {msg}", flush=True)


# ---------------------------------------------------------------- rendezvous and node environment


def slurm_hostnames() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise SkipGPTError("SLURM_JOB_NODELIST is not set: run this inside a Slurm job (sbatch / srun)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise SkipGPTError(f"`scontrol show hostnames {nodelist}` failed: {out.stderr.strip()[:200]}")
    return hosts


def rendezvous_port(job_id: int | str) -> int:
    """Fixed per job (so a requeued job reuses it) and spread over jobs sharing a node."""
    return 29500 + int(job_id) % 10000


def node_environment(gpus_per_node: int) -> dict[str, str]:
    """Environment every rank of a node gets (the same values slurm/common.sh exports)."""
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "SKIPGPT_EXPECT_GPUS": str(gpus_per_node)}
    if gpus_per_node > 0:
        cpus = int(os.environ.get("SLURM_CPUS_ON_NODE", gpus_per_node))
        env.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, cpus // gpus_per_node))),
                   TORCH_NCCL_ASYNC_ERROR_HANDLING="1", NCCL_DEBUG=os.environ.get("NCCL_DEBUG", "WARN"))
    else:  # CPU: gloo; one thread per rank (ranks share the node's cores); DeepSpeed's CPU accelerator
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return env


def torchrun_args(nnodes: int, nproc_per_node: int, host: str, port: int, job_id: str) -> list[str]:
    return ["--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{host}:{port}", "--rdzv_id", str(job_id)]


# ---------------------------------------------------------------- per-node launcher (torchrun, exit code 75)


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc; torchrun's ranks are children of its agent)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry))
    return kids


class StopForwarder:
    """SIGUSR1 / SIGTERM: remember the request and pass the signal to the ranks (Slurm usually signals the whole
    step already; a rank that gets it twice only sets its flag twice). The agent itself keeps running, so it
    sees each rank's own exit code."""

    def __init__(self):
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum
        for pid in _children(os.getpid()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _failure_exit_code(codes: list[int], stop_requested: bool) -> int:
    """One exit code for a node whose ranks failed: 75 when they stopped with a checkpoint (or, after a stop
    request, were killed by a signal before training began: nothing lost either), else the first rank's code."""
    if codes and all(c == PREEMPTED_EXIT_CODE for c in codes):
        return PREEMPTED_EXIT_CODE
    if stop_requested and codes and all(c == PREEMPTED_EXIT_CODE or c < 0 for c in codes):
        return PREEMPTED_EXIT_CODE
    first = next((c for c in codes if c != PREEMPTED_EXIT_CODE), codes[0] if codes else 1)
    return 128 - first if first < 0 else (first or 1)


def _node_banner(args) -> None:
    node, nnodes = os.environ.get("SLURM_NODEID", "0"), os.environ.get("SLURM_NNODES", args.nnodes)
    name = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""
    log(f"node {node}/{nnodes} ({name}): {args.nproc_per_node} rank(s), rendezvous {args.rdzv_backend} "
        f"{args.rdzv_endpoint} id {args.rdzv_id}{gpus}")


def _check_gpus(nproc_per_node) -> None:
    want = int(os.environ.get("SKIPGPT_EXPECT_GPUS", "0") or 0)
    if want <= 0:
        return
    import torch

    have = torch.cuda.device_count()
    if have < want or (str(nproc_per_node).isdigit() and int(nproc_per_node) > have):
        name = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
        raise SkipGPTError(f"node {name} has {have} usable GPU(s) but {want} per node were asked for: request "
                           f"them with --gpus-per-node, or set GPUS_PER_NODE={have} (0 = CPU ranks)")


def torchrun(argv: list[str]) -> int:
    """torchrun with `argv`; returns 0, 75 (stopped with a checkpoint on a signal) or the failure's exit code."""
    stop = StopForwarder()  # before the slow imports: an early USR1 must not kill the agent
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent must not turn SIGTERM into "kill the ranks after 30 s": the ranks handle it (checkpoint, exit 75).
    args = torch_run.parse_args(["--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT", *argv])
    if args.rdzv_backend == "c10d" and "is_host" not in (args.rdzv_conf or "") and "SLURM_NODEID" in os.environ:
        # Which node serves the rendezvous store is decided by Slurm's node order, not by hostname guessing
        # (emulated nodes share a host; real nodes may have several names).
        is_host = "1" if os.environ["SLURM_NODEID"] == "0" else "0"
        args.rdzv_conf = ",".join(filter(None, [args.rdzv_conf, f"is_host={is_host}"]))
    _check_gpus(args.nproc_per_node)
    _node_banner(args)
    try:
        torch_run.run(args)
        return 0
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        code = _failure_exit_code(codes, stop.received is not None)
        log(f"ranks exited with {sorted(set(codes))}: launcher exits {code}"
            + (" (stopped with a checkpoint)" if code == PREEMPTED_EXIT_CODE else ""))
        return code
    except SignalException as err:
        return 128 + int(err.sigval)
    except Exception as err:  # rendezvous / store failures: usually a peer node that went away
        if stop.received is not None:
            return PREEMPTED_EXIT_CODE
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"error: launcher: {type(err).__name__}: {first_line}", file=sys.stderr, flush=True)
        return 1
