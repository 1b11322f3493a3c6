#!/usr/bin/env python
"""Prepare the builtin assets once (offline) so the first training run does not pay for them.

    python tools/prepare_assets.py            # same as --all
    python tools/prepare_assets.py --tiny     # the tiny test model only (seconds)
    python tools/prepare_assets.py --smollm2  # SmolLM2-135M only (~1 min the first time)

Prints one line per asset, `name<TAB>folder`. The cache is $SKIPGPT_CACHE (default ~/.cache/skipgpt-dist).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from skipgpt_dist import assets  # noqa: E402
from skipgpt_dist.errors import run_cli  # noqa: E402


@run_cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every builtin asset (default)")
    which.add_argument("--tiny", action="store_true", help="builtin:tiny, the tiny test model")
    which.add_argument("--smollm2", action="store_true", help="builtin:smollm2-135m")
    args = parser.parse_args(argv)
    every = not (args.tiny or args.smollm2)
    names = [assets.TINY] * (every or args.tiny) + [assets.SMOLLM2] * (every or args.smollm2)
    out = sys.stdout
    print(f"cache\t{assets.cache_dir()}", file=out, flush=True)
    for name in names:
        with contextlib.redirect_stdout(sys.stderr):  # library chatter to stderr; stdout stays name<TAB>folder
            folder = assets.resolve_model_path(name)
        print(f"{name}\t{folder}", file=out, flush=True)
    if every:
        for name in (assets.SHAKESPEARE_TRAIN, assets.SHAKESPEARE_EVAL):
            files = assets.resolve_data_files([name])
            print(f"{name}\t{os.path.dirname(files[0])} ({len(files)} files)", file=out, flush=True)

if __name__ == "__main__":
    main()
