"""After a failed srun step, requeue or not: what the failure was (preempted / infrastructure / the job's own
error, from the exit code and the job log) and whether requeueing can make progress. `python -m
skipgpt_dist.launch after-srun` is slurm/common.sh's entry; the decision is appended to RUN_DIR/requeues.log.
Reads trainer_state.json only (no torch import: this runs in the batch script)."""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from .file_names import CHECKPOINTS, STATE_FILE
from .node_launcher import PREEMPTED_EXIT_CODE

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
    folder = Path(run_dir or "") / CHECKPOINTS
    steps = []
    for child in folder.glob("step_*") if run_dir and folder.is_dir() else ():
        try:
            state = json.loads((child / STATE_FILE).read_text())
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
