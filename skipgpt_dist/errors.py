"""User-facing errors: one line that names the problem and the fix, never a traceback wall."""
from __future__ import annotations

import functools
import sys


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
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


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
