"""Writes that survive a crash: flush a file's bytes, a folder's entries, or a whole tree to disk before the step
that makes them visible (a commit marker, a rename). Used by checkpoints, the run lock and the export tools."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
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
        fsync_dir(Path(dirpath))
