"""User-facing errors: one line that names the problem and the fix, never a traceback wall."""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
import time


class SkipGPTError(Exception):
    """An error caused by user input (config, path, data, checkpoint, launcher argument).

    Its message is one line naming the problem and the fix. Entry points print it as
    ``error: <message>`` and exit with status 2.
    """


def run_cli(main):
    """Decorate an entry point so a SkipGPTError becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SkipGPTError as err:
            print_error_once(f"error: {err}")
            sys.exit(2)

    return wrapper


def print_error_once(line: str) -> None:
    """Write one error line to stderr; under a multi-process launch, once per node for each distinct line.

    Every rank of a torchrun / deepspeed / srun launch usually fails the same check with the same message: the
    first rank of the node to report a line prints it and the others skip it (a rank failing for its own reason
    still prints its own line). The ranks of a node share their launcher process, so a marker file named by the
    parent pid and the line decides; markers older than 10 minutes are stale (a reused pid). The line goes out in
    one write, so concurrent ranks never splice their lines together.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8", "replace")
    if _ranks_on_this_node() > 1:
        key = hashlib.sha1(f"{os.getppid()}|{line}".encode("utf-8", "replace")).hexdigest()[:20]
        marker = os.path.join(tempfile.gettempdir(), f"skipgpt-error-{key}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(marker) < 600:
                    return  # another rank of this launch printed the same line
                os.utime(marker)
            except OSError:
                pass
        except OSError:
            pass  # no writable temp dir: print on every rank rather than lose the line
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), data)
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file descriptor
        sys.stderr.write(data.decode("utf-8"))
        sys.stderr.flush()


def _ranks_on_this_node() -> int:
    try:  # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; WORLD_SIZE bounds it otherwise
        return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE")
                   or 1)
    except ValueError:
        return 1


def read_user_file(path, missing: str, unreadable: str) -> str:
    """Text of a user-named file, or a SkipGPTError: `missing` if it does not exist, else `unreadable` + reason.

    `unreadable` may contain `{reason}`."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SkipGPTError(missing) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SkipGPTError(unreadable.format(reason=f"{type(err).__name__}: {err}")) from None
