#!/bin/bash
# Merge the stage-2 LoRA into the base weights (CPU; one node): tools/merge_lora.py --base BASE --checkpoint
# STAGE2 --out MERGED. Submitted by slurm/pipeline.sh after stage 2 (--dependency=afterok); alone:
#   OUT=runs/llama70b MODEL_PATH=/models/Llama-2-70b-hf sbatch slurm/merge.sh
# Environment: OUT (default runs/skipgpt-70b), STAGE2_RUN (default $OUT/stage2: the run folder or one of its
# checkpoints), MERGED (default $OUT/merged; replaced if it exists), MODEL_PATH (the base; default: model.path of
# the stage-2 run's config), PYTHON, MERGE_CMD (a shell command run instead of the tool, with BASE, CHECKPOINT
# and MERGED in its environment).
#SBATCH --job-name=skipgpt-merge
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
if [ -n "${SLURM_JOB_ID:-}" ]; then  # sbatch runs a spooled copy of this file: ask Slurm where the original is
  SCRIPT=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
fi
SKIPGPT_REPO=${SKIPGPT_REPO:-$(cd "$(dirname "${SCRIPT:-${BASH_SOURCE[0]}}")/.." && pwd)}
source "$SKIPGPT_REPO/slurm/common.sh" || exit 2
skipgpt_require_slurm slurm/merge.sh

OUT=$(skipgpt_abspath "${OUT:-runs/skipgpt-70b}")
export BASE CHECKPOINT MERGED
CHECKPOINT=$(skipgpt_abspath "${STAGE2_RUN:-$OUT/stage2}")
MERGED=$(skipgpt_abspath "${MERGED:-$OUT/merged}")
BASE=$(skipgpt_abspath "${MODEL_PATH:-}")
PYTHON=${PYTHON:-python}
export PYTHONPATH=$SKIPGPT_REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -e "$CHECKPOINT" ] || skipgpt_die "STAGE2_RUN=$CHECKPOINT does not exist: run stage 2 first (slurm/stage2_70b.sh) or fix OUT / STAGE2_RUN"
skipgpt_log "job $SLURM_JOB_ID: merge ${BASE:-(base: model.path of the run config)} + $CHECKPOINT -> $MERGED"
if [ -n "${MERGE_CMD:-}" ]; then
  bash -c "$MERGE_CMD"
else
  [ -f "$SKIPGPT_REPO/tools/merge_lora.py" ] || skipgpt_die "$SKIPGPT_REPO/tools/merge_lora.py not found: set MERGE_CMD"
  "$PYTHON" "$SKIPGPT_REPO/tools/merge_lora.py" ${BASE:+--base "$BASE"} --checkpoint "$CHECKPOINT" --out "$MERGED" --force
fi
rc=$?
[ "$rc" = 0 ] && skipgpt_log "merged model: $MERGED" || echo "error: merge failed with exit code $rc" >&2
exit "$rc"
