"""Atomic checkpoint folders: write to a temp dir, commit with `trainer_state.json`, rename, keep the last N.

Layout of one checkpoint, `run_dir/checkpoints/step_00000050/`:
- whatever the engine's `write_fn(folder)` writes (weights in safetensors, DCP or DeepSpeed shards, optimiser);
- `config.yaml`: the fully resolved TrainConfig;
- `rng_rank{r}.safetensors` (torch CPU/CUDA generator states) + `rng_rank{r}.json` (python `random`, numpy),
  one pair per rank;
- `trainer_state.json`, written last, with `"complete": true`: the commit marker. A folder without it is ignored.

Distributed (torch.distributed initialised): rank 0 names the temp folder and broadcasts it, every rank calls
`write_fn` and saves its RNG, all ranks agree everything succeeded, rank 0 writes the metadata and renames.
The run folder must be on a file system every rank sees. No pickles: JSON + safetensors only.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
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
            with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
                fh.write(state_text)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            self._rename_into_place(tmp, final)
            self._prune(keep=final)
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
        complete = sorted((int(m.group(1)), c) for c in self.root.iterdir()
                          if (m := _STEP_RE.match(c.name)) and c.is_dir() and is_complete(c))
        for _, folder in complete[:-self.keep_last]:
            if folder != keep:
                shutil.rmtree(folder, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint of this run, or None."""
        return _latest_in(self.root)

    def resolve_resume(self, resume: str) -> Optional[Path]:
        """`never` -> None; `auto` -> latest() (None if none); otherwise a checkpoint or run folder path."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        return find_checkpoint(resume, key="checkpoint.resume")

    @staticmethod
    def load_trainer_state(ckpt_dir) -> dict:
        """The committed trainer_state.json of a checkpoint folder."""
        state = _read_state(Path(ckpt_dir))
        if state is None or state.get("complete") is not True:
            raise SkipGPTError(f"{ckpt_dir} has no complete {STATE_FILE}: it is not a finished checkpoint; "
                               "resume from another one (checkpoint.resume=auto picks the newest complete one)")
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
