#!/bin/bash
# Submit the whole recipe as three chained jobs: stage 1 -> stage 2 (its first phase calibrates the stage-1 routers
# on every rank: stage.calibrate in slurm/configs/stage2_70b.yaml) -> LoRA merge, each one starting only if the
# previous one succeeded (--dependency=afterok); when one fails, the jobs after it are cancelled
# (--kill-on-invalid-dep=yes). Run it on a login node (not inside a job):
#   MODEL_PATH=/models/Llama-2-70b-hf OUT=runs/llama70b slurm/pipeline.sh [sbatch options for all three jobs]
# Environment (all optional):
#   OUT                 output folder: OUT/stage1, OUT/stage2, OUT/merged, OUT/logs/%x-%j.out (default runs/skipgpt-70b)
#   MODEL_PATH          the base model, for both stages and the merge (default: each config's model.path)
#   STAGE1_SCRIPT / STAGE2_SCRIPT   default slurm/stage1_70b.sh / slurm/stage2_70b.sh
#   STAGE1_CONFIG / STAGE2_CONFIG   CONFIG of each stage (default: each script's)
#   STAGE1_EXTRA / STAGE2_EXTRA     overrides of one stage (EXTRA: of both), space-separated key=value
#   STAGE1_SBATCH / STAGE2_SBATCH / MERGE_SBATCH   extra sbatch options of one job, e.g. "--time 48:00:00"
#   MERGE_CMD           run instead of tools/merge_lora.py (see slurm/merge.sh)
#   plus everything the stage scripts read (BACKEND, DS_CONFIG, GPUS_PER_NODE, NODES, MAX_REQUEUES, ...)
# Prints one line per job: "stage1 JOBID", "stage2 JOBID", "merge JOBID".
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SKIPGPT_ALLOW_NESTED:-}" ]; then
  echo "error: slurm/pipeline.sh submits jobs: run it on a login node, not inside job $SLURM_JOB_ID" >&2; exit 2
fi
command -v sbatch >/dev/null || { echo "error: sbatch not found: run slurm/pipeline.sh where Slurm's client commands are installed" >&2; exit 2; }
abspath() { case "$1" in /*|builtin:*|"") echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
OUT=$(abspath "${OUT:-runs/skipgpt-70b}")
STAGE1_SCRIPT=${STAGE1_SCRIPT:-$REPO/slurm/stage1_70b.sh}
STAGE2_SCRIPT=${STAGE2_SCRIPT:-$REPO/slurm/stage2_70b.sh}
for f in "$STAGE1_SCRIPT" "$STAGE2_SCRIPT"; do [ -f "$f" ] || { echo "error: $f not found" >&2; exit 2; }; done
if [ -n "${CONFIG:-}" ]; then
  echo "warning: CONFIG is ignored by slurm/pipeline.sh (it has two stages): set STAGE1_CONFIG / STAGE2_CONFIG" >&2
  unset CONFIG
fi
mkdir -p "$OUT/logs"
export OUT
[ -n "${MODEL_PATH:-}" ] && export MODEL_PATH=$(abspath "$MODEL_PATH")
common=(--parsable --output "$OUT/logs/%x-%j.out" "$@")
# shellcheck disable=SC2086  # *_SBATCH are space-separated option lists by design
submit() {  # NAME CONFIG EXTRA SBATCH_EXTRA SCRIPT [sbatch options...]
  local config=$2 extra=$3 sb=$4 script=$5; shift 5
  env ${config:+CONFIG="$(abspath "$config")"} EXTRA="${EXTRA:-}${EXTRA:+ }$extra" \
    sbatch "${common[@]}" "$@" $sb "$script" | cut -d';' -f1
}
S1=$(submit stage1 "${STAGE1_CONFIG:-}" "${STAGE1_EXTRA:-}" "${STAGE1_SBATCH:-}" "$STAGE1_SCRIPT")
S2=$(submit stage2 "${STAGE2_CONFIG:-}" "${STAGE2_EXTRA:-}" "${STAGE2_SBATCH:-}" "$STAGE2_SCRIPT" \
       --dependency="afterok:$S1" --kill-on-invalid-dep=yes)
MG=$(submit merge "" "" "${MERGE_SBATCH:-}" "$REPO/slurm/merge.sh" --dependency="afterok:$S2" --kill-on-invalid-dep=yes)
echo "stage1 $S1"
echo "stage2 $S2"
echo "merge $MG"
echo "logs: $OUT/logs/" >&2
