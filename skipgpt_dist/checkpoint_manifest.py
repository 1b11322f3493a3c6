"""The commit marker of a checkpoint folder, `trainer_state.json`: whether a folder is complete, the size and
sha256 of every other file it records, and the verification against them that resume and the tools run before
reading anything (the engines' own files hold pickles: a damaged or replaced one is never unpickled)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from .durable import fsync_dir, write_json
from .errors import SkipGPTError
from .file_names import STATE_FILE

FILES_KEY = "files"  # in trainer_state.json: {relative path: {"size": bytes, "sha256": hex}}


def read_state_file(folder: Path) -> Optional[dict]:
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def is_complete(folder) -> bool:
    """True if `folder` is a committed checkpoint (trainer_state.json parseable, with complete: true)."""
    state = read_state_file(Path(folder))
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
    state = read_state_file(folder)
    if state is None or state.get("complete") is not True:
        raise SkipGPTError(f"{folder} has no complete {STATE_FILE}: it is not a checkpoint")
    state[FILES_KEY] = hash_files(folder)
    tmp = folder / f".{STATE_FILE}.tmp{os.getpid()}"
    write_json(tmp, state)
    os.replace(tmp, folder / STATE_FILE)
    fsync_dir(folder)


def verify_checkpoint(folder, under: Optional[str] = None) -> Optional[str]:
    """None if the checkpoint's files are exactly those its trainer_state.json records (sizes and sha256);
    otherwise a short reason. `under` (e.g. "dcp") checks only the files below that sub-folder."""
    folder = Path(folder)
    state = read_state_file(folder)
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
