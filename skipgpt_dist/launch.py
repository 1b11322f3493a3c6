"""Run training on Slurm: submit through submitit, and the per-node launcher that slurm/*.sh use.

    python -m skipgpt_dist.launch --nodes 2 --config configs/tiny.yaml [--wait] [key=value ...]
        Submit one training job with submitit (for users who script sweeps; `submit()` is the Python API).
        Every node runs one launcher (below) that starts --gpus-per-node ranks (or --cpu-ranks-per-node on CPU).
    python -m skipgpt_dist.launch torchrun [torchrun arguments] train.py [train.py arguments]
        The per-node launcher: torchrun (the same arguments, the same elastic agent) that passes the training
        ranks' exit code 75 through (a checkpoint was saved on a stop signal: requeue and resume) instead of
        torchrun's blanket 1, and that leaves SIGUSR1 / SIGTERM to the ranks, whose loop checkpoints and stops.
    python -m skipgpt_dist.launch preflight [--config C] [--ds_config J] [--world-size N] [key=value ...]
        Check a run's inputs in seconds, before any node starts: config, model folder, data files, the
        stage-1 checkpoint of stage 2, the DeepSpeed JSON. One line and exit 2 on the first problem.
    python -m skipgpt_dist.launch after-srun --rc RC [--log LOG --log-offset N] [--stop USR1] --run-dir D ...
        slurm/common.sh's decision after a failed srun step: classify_failure() (preempted | infra | user) and
        requeue_decision() (MAX_REQUEUES, progress since the last infrastructure requeue); appends the decision
        to RUN_DIR/requeues.log and prints `requeue|exit KIND REASON`.

The rendezvous is computed the same way here and in slurm/common.sh: the first host of
`scontrol show hostnames $SLURM_JOB_NODELIST`, port 29500 + job id mod 10000, c10d, id = the job id.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SkipGPTError, run_cli

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


# ---------------------------------------------------------------- after a failed srun step: requeue or not

# What a lost node, the OOM killer or a broken interconnect leave in a job's log (torchrun's failure summary,
# NCCL / gloo / c10d messages, srun and slurmstepd lines). Each: (regex, reason).
INFRA_PATTERNS = (
    (r"exitcode\s*:\s*-9\b|Signal 9 \(SIGKILL\)|ranks exited with \[[-\d, ]*-9\b",
     "a rank was killed by SIGKILL (OOM killer or lost node)"),
    (r"oom[-_ ]kill|Out of memory: Killed process|OUT_OF_MEMORY", "the kernel OOM killer"),
    (r"[Nn]ode failure|NODE_FAIL|DUE TO NODE FAILURE", "a node failed"),
    (r"Watchdog caught collective operation timeout", "NCCL watchdog: collective operation timeout"),
    (r"NCCL error|ncclSystemError|ncclRemoteError|ncclInternalError|NCCL communicator was aborted"
     r"|ProcessGroupNCCL.*(?:[Ee]rror|[Tt]imeout|abort)", "NCCL error"),
    (r"DistNetworkError|DistStoreError|RendezvousConnectionError|RendezvousClosedError",
     "lost the connection to the rendezvous or the other ranks"),
    (r"Connection reset by peer|Connection closed by peer|Broken pipe", "a peer rank went away"),
)
INFRA_SIGNALS = {9: "SIGKILL (OOM killer or lost node)", 7: "SIGBUS (hardware or shared memory)"}
_INFRA_RES = [(re.compile(rx), why) for rx, why in INFRA_PATTERNS]
_PREFIX_RE = re.compile(r"^(?:\[[^\]]*\]:\s?|\d+: )")  # "[rank0]: " (torchrun) or "0: " (srun --label)
_LOG_PREFIX_RE = re.compile(r"^(?:\[[^\]]*\]:\s?)?(?:[EWIF]\d{4} [\d:.]+ \d+ \S+\] )?")  # rank, glog/torch
_EXC_RE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit))(?::\s*(.*))?$")
_WRAPPER_EXCEPTIONS = {"ChildFailedError", "SignalException", "SystemExit"}


def _infra_evidence(text: str) -> str | None:
    """The first INFRA_PATTERNS entry (most specific first) found in `text`, with the line it is on."""
    for regex, why in _INFRA_RES:
        match = regex.search(text)
        if match:
            start = text.rfind("\n", 0, match.start()) + 1
            end = text.find("\n", match.end())
            line = _LOG_PREFIX_RE.sub("", text[start:end if end >= 0 else len(text)].strip())
            return f"{why}: {line[:120]}"
    return None


def _user_evidence(log: str) -> str | None:
    """The first failure of the job's own making in `log`: a one-line `error:` of a rank (bad config, bad
    input; not the launcher's own `error: launcher: ...`) or the last line of a Python traceback whose
    exception is no infrastructure error (ValueError in user code; not `RuntimeError: Connection reset by
    peer` of a rank whose peer died)."""
    in_traceback = False
    for raw in log.splitlines():
        line = _PREFIX_RE.sub("", raw, count=1)
        if line.startswith("error: ") and not line.startswith("error: launcher:"):
            return line.strip()[:200]
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
            continue
        if in_traceback and line and not line[0].isspace():
            match = _EXC_RE.match(line.strip())
            if match:
                in_traceback = False
                if match.group(1) not in _WRAPPER_EXCEPTIONS and _infra_evidence(line) is None:
                    return line.strip()[:200]
    return None


def classify_failure(rc: int, log: str = "", stop_signal: str | None = None) -> tuple[str, str]:
    """Why an srun step of a training job failed, from what the batch script sees: srun's exit code `rc`, the
    step's part of the job log, and the stop signal the script got (None or "USR1"). Returns (kind, reason),
    kind one of:
      "preempted"  stopped with a checkpoint on a stop signal: exit 75, or killed by a signal after USR1
      "user"       the job's own fault, never requeued: exit 2 (a one-line `error:`: bad config or input), a
                   Python exception in the ranks (a traceback whose exception is no infrastructure error), or
                   any other exit without infrastructure evidence
      "infra"      the infrastructure's fault: an INFRA_PATTERNS line in the log (torchrun `exitcode : -9`, NCCL
                   errors, lost peers, node failure, OOM kill) or a step killed by SIGKILL / SIGBUS (137, 135)
    Evidence of a user error wins over infrastructure evidence: when one rank raises, its peers fail with
    "Connection reset by peer" or an NCCL timeout, and requeueing would only repeat the error."""
    if rc == PREEMPTED_EXIT_CODE:
        return "preempted", "stopped with a checkpoint (exit 75)"
    if stop_signal == "USR1" and rc > 128:
        return "preempted", f"killed by signal {rc - 128} after SIGUSR1, before training went on"
    user = _user_evidence(log)
    if rc == 2 or user:
        return "user", user or "exit 2 (a one-line error above)"
    infra = _infra_evidence(log)
    if infra:
        return "infra", infra
    if rc - 128 in INFRA_SIGNALS:
        return "infra", f"the step was killed by {INFRA_SIGNALS[rc - 128]} (exit {rc})"
    return "user", f"exit {rc} without sign of an infrastructure fault"


def latest_checkpoint_step(run_dir: str | os.PathLike | None) -> int | None:
    """Step of the newest complete checkpoint under run_dir/checkpoints (what checkpoint.resume=auto resumes
    from), or None. Reads trainer_state.json only (no torch import: this runs in the batch script)."""
    folder = Path(run_dir or "") / "checkpoints"
    steps = []
    for child in folder.glob("step_*") if run_dir and folder.is_dir() else ():
        try:
            state = json.loads((child / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("complete") is True and child.name[5:].isdigit():
            steps.append(int(child.name[5:]))
    return max(steps) if steps else None


def requeue_decision(kind: str, restarts: int, max_requeues: int, checkpoint_step: int | None,
                     last_infra_step: int | None | bool = False) -> tuple[bool, str]:
    """Whether the batch script requeues a failed job. `last_infra_step`: the checkpoint step recorded when
    this job was last requeued for an infrastructure fault (None: there was no checkpoint then), False if it
    never was. The rule:
      user       never
      any kind   not after MAX_REQUEUES restarts (SLURM_RESTART_COUNT >= max_requeues)
      preempted  yes (the ranks saved a checkpoint on the signal)
      infra      yes if progress is possible: the first infrastructure failure of the job always (it resumes
                 from the newest complete checkpoint, or starts over when there is none yet); a later one only
                 if a newer checkpoint was written since the last infrastructure requeue, so a fault that
                 repeats before any progress (a bad node Slurm does not drain, a hang at the same step) stops
                 the job instead of burning MAX_REQUEUES allocations."""
    if kind == "user":
        return False, "the job's own error: requeueing would repeat it"
    if restarts >= max_requeues:
        return False, f"already requeued {restarts} times (MAX_REQUEUES={max_requeues})"
    if kind == "preempted":
        return True, "stopped with a checkpoint"
    if last_infra_step is False:
        return True, "first infrastructure failure of this job"
    if checkpoint_step is not None and (last_infra_step is None or checkpoint_step > last_infra_step):
        return True, f"progress since the last infrastructure requeue (checkpoint step {checkpoint_step})"
    return False, (f"no new checkpoint since the last infrastructure requeue (step "
                   f"{'none' if last_infra_step is None else last_infra_step}): the fault repeats before any progress")


REQUEUE_LOG = "requeues.log"


def _last_infra_requeue(run_dir: str | None, job_id: str) -> int | None | bool:
    path = Path(run_dir or "") / REQUEUE_LOG
    last: int | None | bool = False
    try:
        lines = path.read_text(errors="replace").splitlines() if run_dir else []
    except OSError:
        lines = []
    for line in lines:
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if fields.get("job") == str(job_id) and fields.get("action") == "requeue" and fields.get("kind") == "infra":
            step = fields.get("checkpoint_step", "none")
            last = int(step) if step.lstrip("-").isdigit() else None
    return last


def _rank_exit_codes(log: str) -> list[int]:
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", log)]
    for group in re.findall(r"ranks exited with \[([-\d, ]*)\]", log):
        codes += [int(c) for c in group.replace(",", " ").split()]
    return sorted(set(codes))


def after_srun_main(argv: list[str]) -> int:
    """`python -m skipgpt_dist.launch after-srun --rc RC ...`: slurm/common.sh's decision after a failed srun
    step. Prints one line `ACTION KIND REASON` (ACTION requeue or exit) and appends the decision to
    RUN_DIR/requeues.log. Never fails on a missing log or run folder."""
    parser = argparse.ArgumentParser(prog="python -m skipgpt_dist.launch after-srun")
    parser.add_argument("--rc", type=int, required=True, help="srun's exit code")
    parser.add_argument("--log", help="the job log")
    parser.add_argument("--log-offset", type=int, default=0, help="where this step's output starts in --log")
    parser.add_argument("--stop", choices=["USR1"], help="the stop signal the batch script got")
    parser.add_argument("--run-dir")
    parser.add_argument("--job-id", default=os.environ.get("SLURM_JOB_ID", "0"))
    parser.add_argument("--restarts", type=int, default=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))
    parser.add_argument("--max-requeues", type=int, default=20)
    args = parser.parse_args(argv)
    text = ""
    if args.log:
        try:
            with open(args.log, "rb") as fh:
                fh.seek(max(0, args.log_offset))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            pass
    kind, reason = classify_failure(args.rc, text, args.stop)
    step = latest_checkpoint_step(args.run_dir)
    requeue, why = requeue_decision(kind, args.restarts, args.max_requeues, step,
                                    _last_infra_requeue(args.run_dir, args.job_id) if kind == "infra" else False)
    reason = " ".join(reason.split())
    action = "requeue" if requeue else "exit"
    if args.run_dir and not os.path.isdir(args.run_dir) and os.path.isdir(os.path.dirname(args.run_dir)):
        os.makedirs(args.run_dir, exist_ok=True)  # ranks that failed before creating it: say why here
    if args.run_dir and os.path.isdir(args.run_dir):
        codes = ",".join(map(str, _rank_exit_codes(text))) or "-"
        line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} job={args.job_id} restart={args.restarts} "
                f"action={action} kind={kind} srun_exit={args.rc} rank_exits={codes} "
                f"checkpoint_step={'none' if step is None else step} max_requeues={args.max_requeues} "
                f"reason={reason!r} decision={why!r}\n")
        try:
            with open(Path(args.run_dir) / REQUEUE_LOG, "a") as fh:
                fh.write(line)
        except OSError:
            pass
    print(f"{action} {kind} {reason} [{why}]", flush=True)
    return 0


# ---------------------------------------------------------------- preflight: check inputs before any node starts


def _check_exists(path: str, key: str, what: str) -> None:
    if not os.path.exists(os.path.expanduser(path)):
        raise SkipGPTError(f"{key}: {what} {path} does not exist: fix the path")


def preflight(cfg, world_size: int = 1) -> None:
    """Raise SkipGPTError (one line) for the inputs a run would fail on; touch nothing."""
    from . import assets
    from .checkpoint import find_checkpoint

    path = str(cfg.model.path)
    if path.startswith("builtin:"):
        if path not in (assets.SMOLLM2, assets.TINY):
            raise SkipGPTError(f"model.path={path}: unknown builtin model: use {assets.SMOLLM2} or {assets.TINY}")
    else:
        assets.resolve_model_path(path)  # a folder with config.json, or a one-line error
    for key in ("train_files", "eval_files"):
        for entry in assets.resolve_data_files(getattr(cfg.data, key), key=f"data.{key}"):
            _check_exists(entry, f"data.{key}", "data file")
    if cfg.stage.stage == 2:
        find_checkpoint(cfg.stage.init_from, key="stage.init_from")
    if cfg.checkpoint.resume not in ("auto", "never"):
        find_checkpoint(cfg.checkpoint.resume, key="checkpoint.resume")
    if cfg.parallel.ds_config is not None:
        _check_exists(cfg.parallel.ds_config, "parallel.ds_config", "DeepSpeed config")
    if cfg.parallel.backend == "none" and world_size > 1:
        raise SkipGPTError(f"parallel.backend=none cannot run on {world_size} ranks: use BACKEND=fsdp2 or "
                           "deepspeed, or one node with one rank")


def load_run_config(config: str | None, overrides: list[str], ds_config: str | None = None):
    from .config import load_config

    overrides = list(overrides)
    if ds_config:
        overrides += ["parallel.backend=deepspeed", f"parallel.ds_config={ds_config}"]
    return load_config(config, overrides, for_training=True)


def preflight_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m skipgpt_dist.launch preflight")
    parser.add_argument("--config")
    parser.add_argument("--ds_config")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.config, args.overrides, args.ds_config)
    preflight(cfg, args.world_size)
    print(f"preflight ok: stage {cfg.stage.stage}, model {cfg.model.path}, backend {cfg.parallel.backend}, "
          f"run_dir {cfg.run_dir}", flush=True)
    return 0


# ---------------------------------------------------------------- submitit


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


def submit_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m skipgpt_dist.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training YAML (configs/...)")
    parser.add_argument("--ds_config", help="DeepSpeed JSON; implies --backend deepspeed")
    parser.add_argument("--backend", default="fsdp2", choices=["fsdp2", "deepspeed", "none"])
    parser.add_argument("--output", help="output folder (default runs/JOB_NAME): the run in OUTPUT/stage<N>, "
                        "submitit's logs in OUTPUT/logs/submitit")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU ranks with gloo")
    parser.add_argument("--cpu-ranks-per-node", type=int, default=1)
    parser.add_argument("--partition")
    parser.add_argument("--time", type=int, default=60, help="time limit in minutes")
    parser.add_argument("--cpus-per-node", type=int)
    parser.add_argument("--mem")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--exclusive", action="store_true")
    parser.add_argument("--job-name", default="skipgpt")
    parser.add_argument("--signal-delay", type=int, default=300, help="seconds before the time limit for USR1")
    parser.add_argument("--max-requeues", type=int, default=20)
    parser.add_argument("--wait", action="store_true", help="wait for the job; exit 0 only if it succeeded")
    parser.add_argument("overrides", nargs="*", help="config overrides such as optim.max_steps=100")
    args = parser.parse_args(argv)
    if args.signal_delay >= args.time * 60:
        raise SkipGPTError(f"--signal-delay={args.signal_delay} s is not shorter than --time={args.time} min: "
                           "lower --signal-delay or raise --time")
    for name in ("nodes", "gpus_per_node", "cpu_ranks_per_node", "time"):
        if getattr(args, name) < (0 if name == "gpus_per_node" else 1):
            raise SkipGPTError(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range")
    opts = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        cpu_ranks_per_node=args.cpu_ranks_per_node, partition=args.partition, time_min=args.time,
                        cpus_per_node=args.cpus_per_node, mem=args.mem, account=args.account, qos=args.qos,
                        exclusive=args.exclusive, job_name=args.job_name, signal_delay_s=args.signal_delay,
                        max_requeues=args.max_requeues)
    job = submit(args.config, args.overrides, output=args.output, backend=args.backend, ds_config=args.ds_config,
                 slurm=opts)
    print(f"submitted job {job.job_id}: log {job.paths.stdout}", flush=True)
    if not args.wait:
        return 0
    wait_for(job)
    try:
        job.results()
    except Exception as err:  # submitit's FailedJobError / UncompletedJobError carry the remote traceback
        lines = [line for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise SkipGPTError(f"job {job.job_id} failed ({reason.strip()[:300]}): see {job.paths.stdout}") from None
    print(f"job {job.job_id} completed", flush=True)
    return 0


@run_cli
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["torchrun"]:
        return torchrun(argv[1:])
    if argv[:1] == ["preflight"]:
        return preflight_main(argv[1:])
    if argv[:1] == ["after-srun"]:
        return after_srun_main(argv[1:])
    return submit_main(argv)


if __name__ == "__main__":
    sys.exit(main())
