"""Outputs that appear whole or not at all: everything is written into a temp folder (or file) beside the target,
flushed, then renamed into place; a replaced target (`force`) is moved aside first and restored if the rename
fails. The path checks refuse to replace what the caller did not mean to (an existing path without --force, an
input being read, a folder merge_lora did not write)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..durable import fsync_dir, fsync_tree
from ..errors import SkipGPTError


def check_new_path(out: Path, force: bool, flag: str) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise SkipGPTError(f"{flag} {out} already exists: pass --force to replace it, or choose a new path")


def check_not_inside(out: Path, inputs: dict[str, Path], flag: str) -> None:
    """Refuse an output that would replace (or contain) an input being read."""
    target = out.resolve()
    for what, path in inputs.items():
        source = Path(path).resolve()
        if target == source or target in source.parents:
            raise SkipGPTError(f"{flag} {out} would replace the {what} it reads ({source}): choose another path")


def check_replaceable_dir(out: Path, flag: str) -> None:
    """--force replaces an empty folder or a previous export (config.json with a `skipgpt` section), nothing else:
    a typo must not delete an unrelated tree."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SkipGPTError(f"{flag} {out} exists and is not a folder: remove it or choose another path")
    if not any(out.iterdir()):
        return
    try:
        exported = "skipgpt" in json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        exported = False
    if not exported:
        raise SkipGPTError(f"{flag} {out} exists and is not a folder written by merge_lora, so --force does not "
                           "replace it: remove it yourself or choose another path")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it is flushed and renamed to `out` (replacing it if `force`).
    On any error the temp folder is removed and `out` is untouched."""
    out = Path(out).absolute()
    check_new_path(out, force, flag)
    check_replaceable_dir(out, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        fsync_tree(tmp)
        replace_path(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: Path, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    out = Path(out).absolute()
    check_new_path(out, force, flag)
    if out.is_dir():
        raise SkipGPTError(f"{flag} {out} is a folder: give a file name such as {out / 'model.safetensors'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_path(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and restored if the rename fails."""
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)
