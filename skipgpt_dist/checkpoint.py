"""Atomic checkpoint folders: write to a temp dir, commit with `trainer_state.json`, rename, keep the last N.

Layout of one checkpoint, `run_dir/checkpoints/step_00000050/`:
- whatever the engine's `write_fn(folder)` writes (weights in safetensors, DCP or DeepSpeed shards, optimiser);
- `config.yaml`: the fully resolved TrainConfig;
- `rng_rank{r}.safetensors` (torch CPU/CUDA generator states) + `rng_rank{r}.json` (python `random`, numpy),
  one pair per rank;
- `trainer_state.json`, written last, with `"complete": true`: the commit marker. A folder without it is ignored.
  It also records every other file of the folder (`"files": {relative path: {"size", "sha256"}}`), hashed by
  rank 0 after every rank wrote its files. `verify_checkpoint` re-hashes them: resume uses only a checkpoint that
  verifies, and the tools verify an engine's own files (DCP `.metadata`, DeepSpeed `*_states.pt`, which are
  pickles) before anything reads them, so a damaged or replaced file is never unpickled. Pruning (keep_last)
  happens only after the new checkpoint was renamed into place and verified from disk.

One writer per run folder: `RunLock` (`run_dir/.lock`, created with O_EXCL by rank 0 before anything is written).

Distributed (torch.distributed initialised): rank 0 names the temp folder and broadcasts it, every rank calls
`write_fn` and saves its RNG, all ranks agree everything succeeded, rank 0 writes the metadata and renames.
The run folder must be on a file system every rank sees. This module writes no pickles: JSON + safetensors only.
Hashing cost: sha256 runs at roughly 0.5-1 GB/s per core, so the trainable-only checkpoints written here (routers,
LoRA, their optimiser state) take milliseconds; a full-model checkpoint of N GB adds about N seconds per save and
per resume on rank 0.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import save_config
from .errors import SkipGPTError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
ROUTERS_FILE = "routers.safetensors"  # router weights of a checkpoint or export (safetensors)
FILES_KEY = "files"  # in trainer_state.json: {relative path: {"size": bytes, "sha256": hex}}
LOCK_FILE = ".lock"
STALE_LOCK_AGE_S = 24 * 3600  # a lock from another host untouched this long (no checkpoint saved) is stale
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """{"tensors": torch generator states (uint8), "json": python random + numpy states as JSON}."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:
        return {"tensors": tensors, "json": state}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return {"tensors": tensors, "json": state}


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state. CUDA states are restored only when the device count matches."""
    tensors, js = state["tensors"], state["json"]
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                       key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in js:
        import numpy as np

        name, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _save_rng(folder: Path, rank: int) -> None:
    state = capture_rng_state()
    save_file({k: v.contiguous() for k, v in state["tensors"].items()}, str(folder / f"rng_rank{rank}.safetensors"))
    _write_json(folder / f"rng_rank{rank}.json", state["json"])


# ---------------------------------------------------------------- small file-system helpers


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` (and the folders) to disk before the commit marker is written."""
    # Other ranks may still be writing (and renaming their own temp files) in the same folder: a file that
    # vanishes between the listing and the open was renamed by its writer, who flushes it itself.
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _read_state(folder: Path) -> Optional[dict]:
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def is_complete(folder) -> bool:
    """True if `folder` is a committed checkpoint (trainer_state.json parseable, with complete: true)."""
    state = _read_state(Path(folder))
    return state is not None and state.get("complete") is True


# ---------------------------------------------------------------- file hashes (the commit marker's manifest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed_files(folder: Path) -> list[str]:
    """Every file under `folder` except the commit marker, as sorted POSIX paths relative to `folder`."""
    out = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(folder).as_posix()
            if rel != STATE_FILE:
                out.append(rel)
    return sorted(out)


def hash_files(folder) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file of a checkpoint folder but trainer_state.json."""
    folder = Path(folder)
    return {rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)}
            for rel in _listed_files(folder)}


def record_files(folder) -> None:
    """Re-hash a checkpoint folder into its trainer_state.json (atomically): for tools that write a modified copy
    of a checkpoint (e.g. calibrated routers), so that the copy verifies. Never call it on a damaged checkpoint."""
    folder = Path(folder)
    state = _read_state(folder)
    if state is None or state.get("complete") is not True:
        raise SkipGPTError(f"{folder} has no complete {STATE_FILE}: it is not a checkpoint")
    state[FILES_KEY] = hash_files(folder)
    tmp = folder / f".{STATE_FILE}.tmp{os.getpid()}"
    _write_json(tmp, state)
    os.replace(tmp, folder / STATE_FILE)
    _fsync_dir(folder)


def verify_checkpoint(folder, under: Optional[str] = None) -> Optional[str]:
    """None if the checkpoint's files are exactly those its trainer_state.json records (sizes and sha256);
    otherwise a short reason. `under` (e.g. "dcp") checks only the files below that sub-folder."""
    folder = Path(folder)
    state = _read_state(folder)
    if state is None or state.get("complete") is not True:
        return f"no complete {STATE_FILE}"
    files = state.get(FILES_KEY)
    if not isinstance(files, dict):
        return f"its {STATE_FILE} records no file hashes (written before checkpoints were verified)"

    def wanted(rel: str) -> bool:
        return under is None or rel.startswith(under.rstrip("/") + "/")

    for rel, entry in sorted(files.items()):
        if not wanted(rel):
            continue
        if not isinstance(entry, dict) or rel.startswith("/") or ".." in Path(rel).parts:
            return f"{STATE_FILE} has a malformed entry for {rel!r}"
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{rel} has {size} bytes, {entry.get('size')} were written (truncated or replaced)"
        if _sha256(path) != entry.get("sha256"):
            return f"{rel} does not match its recorded sha256 (corrupted or replaced)"
    root = folder / under if under is not None else folder
    if root.is_dir():
        extra = [rel for rel in _listed_files(folder) if wanted(rel) and rel not in files]
        if extra:
            return f"{extra[0]} was not written with the checkpoint ({len(extra)} unrecorded file(s))"
    return None


def _latest_in(checkpoints: Path) -> Optional[Path]:
    found = []
    if checkpoints.is_dir():
        for child in checkpoints.iterdir():
            match = _STEP_RE.match(child.name)
            if match and child.is_dir() and is_complete(child):
                found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def find_checkpoint(path, key: str = "checkpoint.resume") -> Path:
    """A complete checkpoint folder, or the latest one of a run folder (or of its checkpoints/ folder).

    `key` names the config key the path came from, for the error message.
    """
    path = Path(path).expanduser()
    if is_complete(path):
        return path
    for candidate in (path / CHECKPOINTS, path):
        latest = _latest_in(candidate)
        if latest is not None:
            return latest
    problem = "does not exist" if not path.exists() else "is not a complete checkpoint and holds none"
    raise SkipGPTError(f"{key}={str(path)!r} {problem}: pass a checkpoint folder (run_dir/checkpoints/step_N "
                       "with trainer_state.json) or a run folder that has one")


# ---------------------------------------------------------------- distributed helpers (no-ops in one process)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast_from_zero(obj):
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _describe(err: Optional[BaseException]) -> Optional[str]:
    return None if err is None else f"{type(err).__name__}: {err}"


def _all_ok(error: Optional[str]) -> Optional[str]:
    """Gather per-rank errors (None = success); return the first one, or None if every rank succeeded."""
    if not _distributed():
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)


# ---------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves, finds and prunes the checkpoints of one run folder."""

    def __init__(self, run_dir, keep_last: int = 2):
        if keep_last < 1:
            raise SkipGPTError(f"checkpoint.keep_last={keep_last} must be >= 1")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.keep_last = keep_last

    def save(self, step: int, write_fn: Callable[[Path], Any], trainer_state: dict, config=None) -> Path:
        """Write checkpoint `step` atomically; every rank must call this. Returns the final folder.

        If anything fails on any rank, the temp folder is removed, earlier checkpoints are untouched and every
        rank raises (the failing rank re-raises its own exception).
        """
        state_text = json.dumps({**trainer_state, "step": int(step), "complete": True})  # fail early if not JSON
        rank, final = _rank(), self.root / step_dir_name(step)
        tmp_name, error = self._make_tmp(step) if rank == 0 else (None, None)
        tmp_name, error = _broadcast_from_zero((tmp_name, error))
        if error is not None:
            raise SkipGPTError(f"cannot create a temp checkpoint folder in {self.root} ({error}): "
                               "check that run_dir is writable and has free space")
        tmp = self.root / tmp_name
        local = self._write_rank_files(write_fn, tmp, rank)
        error = _all_ok(_describe(local))
        if error is None:  # every rank wrote its files: rank 0 commits, everyone learns whether it worked
            local = self._commit(tmp, final, state_text, config) if rank == 0 else None
            error = _all_ok(_describe(local))
        if error is None:
            return final
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if local is not None:
            raise local
        raise RuntimeError(f"checkpoint step {step} was not saved ({error}); earlier checkpoints are intact")

    def _make_tmp(self, step: int) -> tuple[Optional[str], Optional[str]]:
        """Rank 0: remove stale temp/trash folders of killed runs, then create this save's temp folder.
        Returns (folder name, None) or (None, error)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for child in self.root.iterdir():
                if child.name.startswith((".tmp_", ".trash_")):
                    shutil.rmtree(child, ignore_errors=True)
            tmp = self.root / f".tmp_{step_dir_name(step)}_{os.getpid()}"
            tmp.mkdir()
        except OSError as err:
            return None, str(err)
        return tmp.name, None

    @staticmethod
    def _write_rank_files(write_fn, tmp: Path, rank: int) -> Optional[BaseException]:
        """Every rank: the engine's files, this rank's RNG, then flush. Returns the exception, if any."""
        try:
            write_fn(tmp)
            _save_rng(tmp, rank)
            _fsync_tree(tmp)
        except Exception as err:  # reported to every rank before anyone raises, so no rank hangs
            return err
        return None

    def _commit(self, tmp: Path, final: Path, state_text: str, config) -> Optional[BaseException]:
        """Rank 0: config, commit marker last, rename into place, prune. Returns the exception, if any."""
        try:
            if config is not None:
                save_config(config, tmp / CONFIG_FILE)
            state_text = json.dumps({**json.loads(state_text), FILES_KEY: hash_files(tmp)})
            with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
                fh.write(state_text)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            self._rename_into_place(tmp, final)
            problem = verify_checkpoint(final)  # read back from disk: only a verified checkpoint lets others go
            if problem is not None:
                raise SkipGPTError(f"checkpoint {final} does not verify right after it was written ({problem}): "
                                   "older checkpoints were kept; check the file system of run_dir")
            self._prune(keep=final)
            try:  # heartbeat of the run lock: a live run on another host keeps its lock fresh
                os.utime(self.run_dir / LOCK_FILE)
            except OSError:
                pass
        except Exception as err:
            return err
        return None

    def _rename_into_place(self, tmp: Path, final: Path) -> None:
        if final.exists():  # re-saving a step after a resume: move the old one aside, then drop it
            trash = self.root / f".trash_{final.name}_{os.getpid()}"
            os.rename(final, trash)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(trash, final)  # put the old checkpoint back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)

    def _prune(self, keep: Path) -> None:
        """Drop committed checkpoints beyond the newest keep_last, but only ones older than `keep` (just written
        and verified): a checkpoint is never pruned before a newer one verified."""
        keep_step = int(_STEP_RE.match(keep.name).group(1))
        complete = sorted((int(m.group(1)), c) for c in self.root.iterdir()
                          if (m := _STEP_RE.match(c.name)) and c.is_dir() and is_complete(c))
        for step, folder in complete[:-self.keep_last]:
            if folder != keep and step < keep_step:
                shutil.rmtree(folder, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint of this run, or None."""
        return _latest_in(self.root)

    def resolve_resume(self, resume: str, log: Optional[Callable[[str], None]] = None) -> Optional[Path]:
        """`never` -> None; `auto` -> the newest checkpoint that verifies (None if the run has none; each newer
        one that fails is logged in one line and skipped; an error if some exist and none verifies); otherwise a
        checkpoint or run folder path, which must verify (an error, never a fallback). Every rank calls this in a
        distributed run: rank 0 hashes, the others get its answer."""
        if resume == "never":
            return None
        answer = None
        if _rank() == 0:
            try:
                answer = ("ok", self._resolve(resume, log or _stderr))
            except SkipGPTError as err:
                answer = ("error", str(err))
            except Exception as err:  # e.g. an unreadable folder: every rank must still get an answer
                answer = ("error", f"checkpoint.resume={resume}: cannot check the checkpoints ({_describe(err)})")
        kind, value = _broadcast_from_zero(answer)
        if kind == "error":
            raise SkipGPTError(value)
        return None if value is None else Path(value)

    def _resolve(self, resume: str, log: Callable[[str], None]) -> Optional[str]:
        if resume != "auto":
            path = find_checkpoint(resume, key="checkpoint.resume")
            problem = verify_checkpoint(path)
            if problem is not None:
                raise SkipGPTError(f"checkpoint.resume={resume}: checkpoint {path} does not verify ({problem}): "
                                   "name another checkpoint, or use checkpoint.resume=auto (the newest one that "
                                   "verifies)")
            return str(path)
        candidates = []
        if self.root.is_dir():
            candidates = sorted(((int(m.group(1)), c) for c in self.root.iterdir()
                                 if (m := _STEP_RE.match(c.name)) and c.is_dir()), reverse=True)
        skipped = 0
        for _, folder in candidates:
            problem = verify_checkpoint(folder)
            if problem is None:
                return str(folder)
            skipped += 1
            log(f"checkpoint.resume=auto: skipping {folder} ({problem})")
        if skipped:
            raise SkipGPTError(f"checkpoint.resume=auto: none of the {skipped} checkpoints in {self.root} verifies "
                               "(see the lines above): name one with checkpoint.resume=PATH after repairing it, or "
                               "start over with checkpoint.resume=never (existing checkpoints are kept)")
        return None

    @staticmethod
    def load_trainer_state(ckpt_dir) -> dict:
        """The committed trainer_state.json of a checkpoint folder (without its file manifest)."""
        state = _read_state(Path(ckpt_dir))
        if state is None or state.get("complete") is not True:
            raise SkipGPTError(f"{ckpt_dir} has no complete {STATE_FILE}: it is not a finished checkpoint; "
                               "resume from another one (checkpoint.resume=auto picks the newest complete one)")
        state.pop(FILES_KEY, None)
        return state

    @staticmethod
    def restore_rng(ckpt_dir, rank: int = 0) -> bool:
        """Restore this rank's RNG states; False (nothing changed) if the checkpoint has none for `rank`,
        e.g. after resuming with more ranks than the run was saved with."""
        folder = Path(ckpt_dir)
        tensors_file, json_file = folder / f"rng_rank{rank}.safetensors", folder / f"rng_rank{rank}.json"
        if not (tensors_file.is_file() and json_file.is_file()):
            return False
        state = {"tensors": load_file(str(tensors_file)), "json": json.loads(json_file.read_text(encoding="utf-8"))}
        restore_rng_state(state)
        return True


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one writer per run folder


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
        _write_json(tmp, self._info())
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

    def acquire(self, log: Callable[[str], None] = _stderr) -> "RunLock":
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


def acquire_run_lock(run_dir, log: Callable[[str], None] = _stderr) -> RunLock:
    """Every rank calls this: rank 0 takes the lock, every rank raises the same one-line error if it cannot."""
    lock, error = RunLock(run_dir), None
    if _rank() == 0:
        try:
            lock.acquire(log)
        except SkipGPTError as err:
            error = str(err)
        except OSError as err:
            error = (f"cannot create the run lock {lock.path} ({err}): check that run_dir is writable")
    error = _broadcast_from_zero(error)
    if error is not None:
        raise SkipGPTError(error)
    return lock
