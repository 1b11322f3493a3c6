"""The cache the builtin assets are prepared into (``$SKIPGPT_CACHE``, default ``~/.cache/skipgpt-dist``)::

    models/<name>/         a finished asset (appears atomically: built in models/.tmp-<name>-*, then renamed)
    data/<name>/           a finished data asset, the same way (train/*.txt, eval/*.txt, manifest.json)
    locks/<name>.lock      fcntl lock held while preparing, so concurrent processes (ranks) build it once
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import os
import shutil
import sys
import tempfile

from .errors import SkipGPTError


def log_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> str:
    """The asset cache root: ``$SKIPGPT_CACHE`` or ``~/.cache/skipgpt-dist``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("SKIPGPT_CACHE") or "~/.cache/skipgpt-dist"))


@contextlib.contextmanager
def file_lock(name: str):
    lock_dir = os.path.join(cache_dir(), "locks")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, name + ".lock"), "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log_progress(f"waiting for another process preparing {name} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepared(name: str, build, kind: str = "models") -> str:
    """Return ``<kind>/<name>``; build it once (``build(tmp_dir)``), atomically and under a file lock."""
    final = os.path.join(cache_dir(), kind, name)
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    with file_lock(name):
        if os.path.isdir(final):  # another process finished it while we waited
            return final
        for stale in glob.glob(os.path.join(parent, f".tmp-{name}-*")):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a shared cache should be readable
        try:
            build(tmp)
            for root, dirs, files in os.walk(tmp):  # some writers create 0600 files; a shared cache is readable
                for entry in dirs:
                    os.chmod(os.path.join(root, entry), 0o777 & ~umask)
                for entry in files:
                    os.chmod(os.path.join(root, entry), 0o666 & ~umask)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def package_dir(module: str, pip_cmd: str, what: str) -> str:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SkipGPTError(f"{what} needs the Python package {module!r}, which is not installed: run `{pip_cmd}`")
    return list(spec.submodule_search_locations)[0]
