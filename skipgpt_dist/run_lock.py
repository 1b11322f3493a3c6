"""One writer per run folder: `run_dir/.lock`, taken by rank 0 before anything is written, released at the end,
taken over only when stale (see RunLock)."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from .collectives import broadcast_from_zero, current_rank
from .durable import write_json
from .errors import SkipGPTError
from .file_names import LOCK_FILE

STALE_LOCK_AGE_S = 24 * 3600  # a lock from another host untouched this long (no checkpoint saved) is stale


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _proc_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (Linux /proc), to tell a reused pid from the original; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the ")" of the name


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, ValueError, OSError):
        return False
    now = _proc_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """`run_dir/.lock`: one training run writes a run folder at a time.

    Rank 0 creates it before anything is written (the JSON is written to a temp file and hard-linked into place,
    which fails if the lock exists, so no reader ever sees half a lock). It holds host, pid, the pid's start time,
    start time, SLURM_JOB_ID and a token; `release` removes it only if the token is still ours. An existing lock is
    taken over (with a log line) when it is stale: same host and its pid is dead (or reused), or the same Slurm
    job id (a requeued job), or, from another host, untouched for STALE_LOCK_AGE_S (every checkpoint save touches
    it). Otherwise acquiring is a one-line SkipGPTError naming the owner and the fix.
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.held = False
        self.created: list[Path] = []  # folders acquire() had to create, deepest first

    def _info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_unix": time.time(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "token": self.token}

    def _create(self) -> bool:
        tmp = self.run_dir / f".lock.tmp{os.getpid()}_{self.token[:8]}"
        write_json(tmp, self._info())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: O_EXCL (a reader may briefly see it empty)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(tmp.read_text(encoding="utf-8"))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _owner(self) -> tuple[Optional[dict], float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            info = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):
            return {}, age
        return (info if isinstance(info, dict) else {}), age

    def _stale_reason(self, info: dict, age: float) -> Optional[str]:
        host, pid = info.get("host"), info.get("pid")
        job = os.environ.get("SLURM_JOB_ID")
        same_host = host == socket.gethostname()
        alive = same_host and isinstance(pid, int) and _pid_alive(pid, info.get("pid_start"))
        if same_host and isinstance(pid, int) and not alive:
            return f"pid {pid} on this host ({host}) is no longer running"
        if job and info.get("slurm_job_id") == job and not alive:
            return f"it belongs to an earlier attempt of this Slurm job {job} (requeued)"
        if not same_host and age > STALE_LOCK_AGE_S:
            return f"host {host} has not touched it for {age / 3600:.0f} h"
        return None

    def acquire(self, log: Callable[[str], None] = log_to_stderr) -> "RunLock":
        """Rank 0 only (see acquire_run_lock for every rank)."""
        created, folder = [], self.run_dir.absolute()
        while not folder.exists() and folder != folder.parent:
            created.append(folder)
            folder = folder.parent
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held, self.created = True, created
                return self
            info, age = self._owner()
            if info is None:  # released between our try and the read: try again
                continue
            reason = self._stale_reason(info, age) if info else (
                f"it is unreadable and {age / 3600:.0f} h old" if age > STALE_LOCK_AGE_S else None)
            if reason is None:
                owner = (f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}"
                         + (f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else "")
                         if info else "an unreadable lock")
                raise SkipGPTError(f"run_dir {self.run_dir} is in use by another run ({owner}): wait for it to "
                                   f"finish or use another run_dir; if that run is dead, delete {self.path}")
            log(f"taking over the stale lock {self.path} ({reason})")
            self.path.unlink(missing_ok=True)
        raise SkipGPTError(f"cannot take the lock {self.path}: other runs keep creating it; make sure only one "
                           "run uses this run_dir")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info, _ = self._owner()
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        for folder in self.created:  # a run that failed before writing anything leaves no empty run folder
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def acquire_run_lock(run_dir, log: Callable[[str], None] = log_to_stderr) -> RunLock:
    """Every rank calls this: rank 0 takes the lock, every rank raises the same one-line error if it cannot."""
    lock, error = RunLock(run_dir), None
    if current_rank() == 0:
        try:
            lock.acquire(log)
        except SkipGPTError as err:
            error = str(err)
        except OSError as err:
            error = (f"cannot create the run lock {lock.path} ({err}): check that run_dir is writable")
    error = broadcast_from_zero(error)
    if error is not None:
        raise SkipGPTError(error)
    return lock
