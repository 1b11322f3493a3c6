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

One writer per run folder: `RunLock` (`run_dir/.lock`, created with O_EXCL by rank 0 before anything is written;
run_lock.py).

Distributed (torch.distributed initialised): rank 0 names the temp folder and broadcasts it, every rank calls
`write_fn` and saves its RNG, all ranks agree everything succeeded, rank 0 writes the metadata and renames.
The run folder must be on a file system every rank sees. This module writes no pickles: JSON + safetensors only.
Hashing cost: sha256 runs at roughly 0.5-1 GB/s per core, so the trainable-only checkpoints written here (routers,
LoRA, their optimiser state) take milliseconds; a full-model checkpoint of N GB adds about N seconds per save and
per resume on rank 0.

The pieces live beside this module: the commit marker and its file hashes (checkpoint_manifest.py), RNG states
(rng_state.py), flushing (durable.py), the collectives (collectives.py), the run lock (run_lock.py); their public
names are importable from here too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from safetensors.torch import load_file

from .checkpoint_manifest import (FILES_KEY, read_state_file, hash_files, is_complete, record_files,  # noqa: F401
                                  verify_checkpoint)
from .collectives import all_ranks_ok, broadcast_from_zero, current_rank, describe_error
from .config import save_config
from .durable import fsync_dir, fsync_tree
from .errors import SkipGPTError
from .file_names import CHECKPOINTS, CONFIG_FILE, LOCK_FILE, ROUTERS_FILE, STATE_FILE  # noqa: F401
from .rng_state import capture_rng_state, restore_rng_state, save_rng  # noqa: F401
from .run_lock import STALE_LOCK_AGE_S, RunLock, log_to_stderr, acquire_run_lock  # noqa: F401

_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


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
        rank, final = current_rank(), self.root / step_dir_name(step)
        tmp_name, error = self._make_tmp(step) if rank == 0 else (None, None)
        tmp_name, error = broadcast_from_zero((tmp_name, error))
        if error is not None:
            raise SkipGPTError(f"cannot create a temp checkpoint folder in {self.root} ({error}): "
                               "check that run_dir is writable and has free space")
        tmp = self.root / tmp_name
        local = self._write_rank_files(write_fn, tmp, rank)
        error = all_ranks_ok(describe_error(local))
        if error is None:  # every rank wrote its files: rank 0 commits, everyone learns whether it worked
            local = self._commit(tmp, final, state_text, config) if rank == 0 else None
            error = all_ranks_ok(describe_error(local))
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
            save_rng(tmp, rank)
            fsync_tree(tmp)
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
            fsync_dir(tmp)
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
        fsync_dir(self.root)

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
        if current_rank() == 0:
            try:
                answer = ("ok", self._resolve(resume, log or log_to_stderr))
            except SkipGPTError as err:
                answer = ("error", str(err))
            except Exception as err:  # e.g. an unreadable folder: every rank must still get an answer
                answer = ("error", f"checkpoint.resume={resume}: cannot check the checkpoints ({describe_error(err)})")
        kind, value = broadcast_from_zero(answer)
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
        state = read_state_file(Path(ckpt_dir))
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
