#!/bin/bash
# Stage 2 (LoRA restore, routers of stage 1 frozen) of a 70B model: 8 nodes x 8 GPUs, FSDP2, requeued on USR1
# 300 s before the limit. It starts from INIT_FROM (default $OUT/stage1: the run of slurm/stage1_70b.sh).
#   mkdir -p runs/llama70b/logs && MODEL_PATH=/models/Llama-2-70b-hf OUT=runs/llama70b sbatch --output runs/llama70b/logs/%x-%j.out slurm/stage2_70b.sh
# Everything is overridable: sbatch options on its command line (--nodes, --gpus-per-node, --partition, --time,
# ...), the run in the environment (CONFIG, MODEL_PATH, OUT, BACKEND, DS_CONFIG, GPUS_PER_NODE, NODES, EXTRA,
# MAX_REQUEUES, INIT_FROM: see slurm/common.sh) and config overrides as arguments (optim.max_steps=500 ...).
# A tiny CPU run on the 2-node test cluster (tests/slurm/start.sh), one gloo rank per node:
#   CONFIG=configs/tiny_stage2.yaml MODEL_PATH=builtin:tiny GPUS_PER_NODE=0 OUT=/tmp/t \
#     sbatch --nodes 2 --gpus-per-node 0 --oversubscribe --time 10 slurm/stage2_70b.sh optim.max_steps=10
#SBATCH --job-name=skipgpt-stage2-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
if [ -n "${SLURM_JOB_ID:-}" ]; then  # sbatch runs a spooled copy of this file: ask Slurm where the original is
  SCRIPT=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
fi
SKIPGPT_REPO=${SKIPGPT_REPO:-$(cd "$(dirname "${SCRIPT:-${BASH_SOURCE[0]}}")/.." && pwd)}
source "$SKIPGPT_REPO/slurm/common.sh" || exit 2
skipgpt_require_slurm slurm/stage2_70b.sh

STAGE=2
DEFAULT_CONFIG=$SKIPGPT_REPO/slurm/configs/stage2_70b.yaml
DEFAULT_GPUS_PER_NODE=8
DEFAULT_OUT_NAME=skipgpt-70b
skipgpt_stage_main "$@"
