# shellcheck shell=bash
# slurm/common.sh: the one helper the thin batch scripts in slurm/ source (stage1_13b.sh, stage1_70b.sh,
# stage2_70b.sh). It checks the inputs and the allocation before any node starts, computes the rendezvous
# (first host of `scontrol show hostnames`), starts one launcher per node with srun, and turns a USR1
# (from `--signal=B:USR1@N` before the time limit, or `scancel --signal=USR1 --batch JOB`) into
# "every rank checkpoints at the next step boundary, exits 75, the job requeues itself"; the requeued job
# resumes from the newest complete checkpoint (checkpoint.resume=auto). A step that fails on an infrastructure
# fault (a rank killed by the OOM killer or SIGKILL, a lost node, NCCL / connection errors) is requeued too, within
# MAX_REQUEUES and only while the run makes progress; a job failing on its own error (exit 2: bad config or
# input; a Python exception) never is. The classification and the rule are skipgpt_dist.launch's
# classify_failure() and requeue_decision() (`python -m skipgpt_dist.launch after-srun`); every decision after a
# failed step is one line in the job log and one line in RUN_DIR/requeues.log. Slurm's own requeue of a job that
# lost a node (NODE_FAIL) needs `#SBATCH --requeue`, which every stage script sets.
#
# The caller sets SKIPGPT_REPO, STAGE (1|2) and the defaults DEFAULT_CONFIG, DEFAULT_GPUS_PER_NODE,
# DEFAULT_OUT_NAME, then calls `skipgpt_stage_main "$@"` (the script's arguments are extra key=value overrides). User knobs
# (environment; all optional):
#   CONFIG          training YAML (default: DEFAULT_CONFIG)
#   MODEL_PATH      Hugging Face model folder -> model.path (default: the config's)
#   OUT             output folder (default: runs/DEFAULT_OUT_NAME, relative to the submit directory)
#   RUN_DIR         the run folder (default: $OUT/stage$STAGE)
#   INIT_FROM       stage 2: the stage-1 run folder or checkpoint (default: $OUT/stage1)
#   BACKEND         fsdp2 | deepspeed | none (default: fsdp2)
#   DS_CONFIG       DeepSpeed JSON (implies BACKEND=deepspeed; BACKEND=deepspeed alone uses ds_configs/zero3.json,
#                   the production ZeRO-3 settings; ds_configs/zero3_offload.json when GPU memory is short)
#   GPUS_PER_NODE   GPUs (= ranks) per node; 0 = CPU ranks with gloo (default: DEFAULT_GPUS_PER_NODE)
#   CPU_RANKS_PER_NODE  ranks per node when GPUS_PER_NODE=0 (default 1)
#   NODES           the node count this run expects; the job fails fast if the allocation differs
#   EXTRA           extra overrides, space-separated (e.g. "optim.max_steps=100 optim.lr=1e-3")
#   MAX_REQUEUES    give up requeueing after this many restarts (SLURM_RESTART_COUNT; default 20)
#   RDZV_PORT       rendezvous port (default 29500 + job id % 10000)
#   PYTHON          python with skipgpt_dist installed (default: python)

skipgpt_die() {  # one line, exit 2: the job ends FAILED before anything is written
  echo "error: $*" >&2
  exit 2
}

skipgpt_log() { echo "[skipgpt $(date +%T)] $*"; }

skipgpt_require_slurm() {  # $1: script name
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: $1 is a Slurm batch script: submit it with \`sbatch [--nodes N ...] $1 [key=value ...]\`" \
         "(or run python -m skipgpt_dist.launch); SLURM_JOB_ID is not set here" >&2
    exit 2
  fi
}

skipgpt_abspath() {  # relative paths are relative to the submit directory (the job's working directory)
  case "$1" in /*|builtin:*) echo "$1" ;; "") echo "" ;; *) echo "$PWD/$1" ;; esac
}

skipgpt_visible_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Knobs -> variables; then every check that can fail before srun (each a one-line error, exit 2).
skipgpt_resolve_and_check() {
  CONFIG=$(skipgpt_abspath "${CONFIG:-$DEFAULT_CONFIG}")
  OUT=$(skipgpt_abspath "${OUT:-runs/$DEFAULT_OUT_NAME}")
  RUN_DIR=$(skipgpt_abspath "${RUN_DIR:-$OUT/stage$STAGE}")
  INIT_FROM=$(skipgpt_abspath "${INIT_FROM:-$OUT/stage1}")
  MODEL_PATH=$(skipgpt_abspath "${MODEL_PATH:-}")
  DS_CONFIG=$(skipgpt_abspath "${DS_CONFIG:-}")
  BACKEND=${BACKEND:-fsdp2}
  [ -n "$DS_CONFIG" ] && BACKEND=deepspeed
  # ZeRO-3 for a 13B-70B model: never the python-side built-in config by accident
  [ "$BACKEND" = deepspeed ] && [ -z "$DS_CONFIG" ] && DS_CONFIG=$SKIPGPT_REPO/ds_configs/zero3.json
  GPUS_PER_NODE=${GPUS_PER_NODE:-$DEFAULT_GPUS_PER_NODE}
  CPU_RANKS_PER_NODE=${CPU_RANKS_PER_NODE:-1}
  MAX_REQUEUES=${MAX_REQUEUES:-20}
  PYTHON=${PYTHON:-python}
  RDZV_PORT=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
  export PYTHONPATH=$SKIPGPT_REPO${PYTHONPATH:+:$PYTHONPATH}   # skipgpt_dist importable without an install

  [ -f "$CONFIG" ] || skipgpt_die "CONFIG=$CONFIG not found: set CONFIG to a training YAML (configs/, slurm/configs/)"
  if [ -n "$MODEL_PATH" ] && [ "${MODEL_PATH#builtin:}" = "$MODEL_PATH" ] && [ ! -f "$MODEL_PATH/config.json" ]; then
    skipgpt_die "MODEL_PATH=$MODEL_PATH is not a Hugging Face model folder (no config.json): fix MODEL_PATH"
  fi
  [ -z "$DS_CONFIG" ] || [ -f "$DS_CONFIG" ] || skipgpt_die "DS_CONFIG=$DS_CONFIG not found: fix DS_CONFIG"
  case "$BACKEND" in
    fsdp2|deepspeed|none) ;;
    *) skipgpt_die "BACKEND=$BACKEND is not supported: use fsdp2, deepspeed or none" ;;
  esac
  case "$GPUS_PER_NODE$CPU_RANKS_PER_NODE$MAX_REQUEUES" in
    *[!0-9]*) skipgpt_die "GPUS_PER_NODE, CPU_RANKS_PER_NODE and MAX_REQUEUES must be whole numbers" ;;
  esac
  if [ -n "${NODES:-}" ] && [ "$NODES" != "$SLURM_NNODES" ]; then
    skipgpt_die "this run expects NODES=$NODES nodes but the job has $SLURM_NNODES ($SLURM_JOB_NODELIST):" \
                "submit with \`sbatch --nodes $NODES\` or set NODES=$SLURM_NNODES"
  fi
  if [ "$GPUS_PER_NODE" -gt 0 ]; then
    local visible; visible=$(skipgpt_visible_gpus)
    if [ "$visible" -lt "$GPUS_PER_NODE" ]; then
      skipgpt_die "GPUS_PER_NODE=$GPUS_PER_NODE but $visible GPU(s) are visible on ${SLURMD_NODENAME:-this node}:" \
                  "submit with \`sbatch --gpus-per-node $GPUS_PER_NODE\` or set GPUS_PER_NODE=$visible (0 = CPU ranks)"
    fi
    NPROC_PER_NODE=$GPUS_PER_NODE
  else
    [ "$CPU_RANKS_PER_NODE" -ge 1 ] || skipgpt_die "CPU_RANKS_PER_NODE=$CPU_RANKS_PER_NODE: use 1 or more"
    NPROC_PER_NODE=$CPU_RANKS_PER_NODE
  fi
  [ "$STAGE" = 2 ] && OVERRIDES+=("stage.init_from=$INIT_FROM")
  [ -n "$MODEL_PATH" ] && OVERRIDES+=("model.path=$MODEL_PATH")
  OVERRIDES+=("run_dir=$RUN_DIR")
  [ "$BACKEND" = deepspeed ] || OVERRIDES+=("parallel.backend=$BACKEND")
  local extra; read -r -a extra <<< "${EXTRA:-}"   # space-separated; no glob expansion of [..] or *
  OVERRIDES+=("${extra[@]}" "$@")
  TRAIN_ARGS=(--config "$CONFIG")
  # --ds_config implies parallel.backend=deepspeed (train.py); DS_CONFIG is always set with BACKEND=deepspeed
  [ "$BACKEND" = deepspeed ] && TRAIN_ARGS+=(--ds_config "$DS_CONFIG")
  TRAIN_ARGS+=("${OVERRIDES[@]}")
  # config keys, model folder, data files, stage-1 checkpoint: a few seconds here instead of after rendezvous
  "$PYTHON" -m skipgpt_dist.launch preflight --world-size $((SLURM_NNODES * NPROC_PER_NODE)) "${TRAIN_ARGS[@]}" \
    || exit 2
}

skipgpt_export_env() {
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false SKIPGPT_EXPECT_GPUS=$GPUS_PER_NODE
  if [ "$GPUS_PER_NODE" -gt 0 ]; then
    local cpus=${SLURM_CPUS_ON_NODE:-$GPUS_PER_NODE}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1 ))}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  else
    export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu   # gloo ranks share the node's cores
  fi
}

# Signals. USR1: checkpoint and requeue. TERM (scancel, time limit, Slurm's own requeue or preemption): the
# ranks checkpoint too, but this script does not requeue (a cancelled job must stay cancelled).
GOT_USR1=0; GOT_TERM=0; SRUN_PID=""; INTERRUPTED=0
skipgpt_on_signal() {
  INTERRUPTED=1
  if [ "$1" = USR1 ]; then GOT_USR1=1; else GOT_TERM=1; fi
  skipgpt_log "batch script got SIG$1: every rank checkpoints at the next step boundary and stops"
  [ -n "$SRUN_PID" ] && kill -"$1" "$SRUN_PID" 2>/dev/null   # srun passes it to every process of the step
  return 0
}

SKIPGPT_SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JOB_LOG=""; LOG_OFFSET=0   # the job log and where this run's srun output starts in it (--open-mode=append)

skipgpt_requeue_or_exit() {  # $1: srun's exit code
  local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
  if [ "$rc" = 0 ]; then
    skipgpt_log "training finished: $RUN_DIR"
    exit 0
  fi
  if [ "$GOT_TERM" = 1 ]; then  # scancel, time limit, Slurm's own requeue or preemption: never requeued here
    if [ "$rc" = 75 ]; then
      skipgpt_log "stopped with a checkpoint on SIGTERM (not requeued by this script): resubmit to continue from $RUN_DIR"
      exit 75
    fi
    echo "error: training failed with exit code $rc on job $SLURM_JOB_ID after SIGTERM (not requeued): see the lines above" >&2
    exit "$rc"
  fi
  # preempted | infra | user, and whether to requeue: skipgpt_dist.launch classify_failure / requeue_decision
  local decision args=(--rc "$rc" --job-id "$SLURM_JOB_ID" --restarts "$restarts" --max-requeues "$MAX_REQUEUES"
                       --run-dir "$RUN_DIR")
  [ -n "$JOB_LOG" ] && args+=(--log "$JOB_LOG" --log-offset "$LOG_OFFSET")
  [ "$GOT_USR1" = 1 ] && args+=(--stop USR1)
  decision=$(PYTHONPATH=${SKIPGPT_REPO:-$SKIPGPT_SLURM_DIR/..}${PYTHONPATH:+:$PYTHONPATH} \
             "${PYTHON:-python}" -m skipgpt_dist.launch after-srun "${args[@]}" 2>/dev/null | tail -n1)
  local action=${decision%% *} rest=${decision#* } kind reason
  kind=${rest%% *}; reason=${rest#* }
  case "$action:$kind" in
    requeue:preempted)
      skipgpt_log "stopped with a checkpoint (exit $rc): requeueing job $SLURM_JOB_ID" \
                  "(restart $((restarts + 1)) of at most $MAX_REQUEUES)" ;;
    requeue:infra)
      skipgpt_log "infrastructure failure (exit $rc): $reason: requeueing job $SLURM_JOB_ID" \
                  "(restart $((restarts + 1)) of at most $MAX_REQUEUES), resuming from the newest checkpoint of $RUN_DIR" ;;
    exit:preempted)
      echo "error: stopped with a checkpoint but the job was already requeued $restarts times" \
           "(MAX_REQUEUES=$MAX_REQUEUES): submit it again to continue from $RUN_DIR" >&2
      exit 75 ;;
    exit:infra)
      echo "error: training failed on an infrastructure fault (exit $rc) on job $SLURM_JOB_ID, not requeued:" \
           "$reason: submit it again to continue from $RUN_DIR" >&2
      exit "$rc" ;;
    exit:user)
      echo "error: training failed with exit code $rc on job $SLURM_JOB_ID (the job's own error, not requeued:" \
           "${reason% \[*}): see the lines above" >&2
      exit "$rc" ;;
    *)
      echo "error: training failed with exit code $rc on job $SLURM_JOB_ID (not requeued; the requeue check" \
           "\`$PYTHON -m skipgpt_dist.launch after-srun\` gave no answer): see the lines above" >&2
      exit "$rc" ;;
  esac
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "error: scontrol requeue $SLURM_JOB_ID failed: submit again to continue from $RUN_DIR" >&2
    exit 75
  fi
  exit 0
}

# TEST ONLY (tests/test_slurm.py): SKIPGPT_TEST_FAULT=kill_rank_after_checkpoint SIGKILLs one training rank on the
# job's last node once the run has a complete checkpoint, on the job's first run only: what the OOM killer or a
# lost node does to a rank. Only processes of this job (SLURM_JOB_ID in their environment) are looked at.
skipgpt_test_fault() {
  [ "${SKIPGPT_TEST_FAULT:-}" = kill_rank_after_checkpoint ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ] || return 0
  local node=$((SLURM_NNODES - 1))
  (
    while [ -d "/proc/$SRUN_PID" ]; do
      if grep -qs '"complete": true' "$RUN_DIR"/checkpoints/step_*/trainer_state.json; then
        for env in /proc/[0-9]*/environ; do
          grep -qzx "SLURM_JOB_ID=$SLURM_JOB_ID" "$env" 2>/dev/null || continue
          grep -qzx "SLURM_NODEID=$node" "$env" 2>/dev/null && grep -qzx "LOCAL_RANK=0" "$env" 2>/dev/null || continue
          pid=${env#/proc/}; pid=${pid%/environ}
          grep -qa train.py "/proc/$pid/cmdline" 2>/dev/null || continue
          # the rank itself, not a worker it forked: its parent (torchrun's agent) has no LOCAL_RANK
          grep -qzx "LOCAL_RANK=0" "/proc/$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null)/environ" 2>/dev/null && continue
          skipgpt_log "test fault: SIGKILL to training rank pid $pid on node $node"
          kill -KILL "$pid" 2>/dev/null && exit 0
        done
      fi
      sleep 0.2
    done
  ) &
}

skipgpt_stage_main() {
  trap 'skipgpt_on_signal USR1' USR1
  trap 'skipgpt_on_signal TERM' TERM
  OVERRIDES=()
  skipgpt_resolve_and_check "$@"
  skipgpt_export_env
  local host nodes
  nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')
  host=${nodes%% *}
  mkdir -p "$OUT/logs"
  local log; log=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *StdOut=//p' | head -n1)
  if [ -f "$log" ] && [ "$(dirname "$log")" != "$OUT/logs" ]; then  # the job log, also findable from OUT
    ln -sfn "$log" "$OUT/logs/$(basename "$log")"
  fi
  skipgpt_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}: stage $STAGE on" \
              "$SLURM_NNODES node(s) [${nodes% }] x $NPROC_PER_NODE rank(s), backend $BACKEND," \
              "rendezvous $host:$RDZV_PORT, run_dir $RUN_DIR"
  if [ "$GOT_USR1" = 1 ] || [ "$GOT_TERM" = 1 ]; then skipgpt_requeue_or_exit 75; fi
  if [ -f "$log" ]; then JOB_LOG=$log; LOG_OFFSET=$(stat -c %s "$log" 2>/dev/null || echo 0); fi
  # --kill-on-bad-exit: a node whose launcher fails ends the step at once, instead of leaving the other nodes
  # waiting in a collective until the NCCL/gloo timeout burns the allocation.
  srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
    "$PYTHON" -u -m skipgpt_dist.launch torchrun \
      --nnodes "$SLURM_NNODES" --nproc_per_node "$NPROC_PER_NODE" \
      --rdzv_backend c10d --rdzv_endpoint "$host:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \
      "$SKIPGPT_REPO/train.py" "${TRAIN_ARGS[@]}" &
  SRUN_PID=$!
  skipgpt_test_fault
  local rc
  while :; do
    INTERRUPTED=0
    wait "$SRUN_PID"; rc=$?
    [ "$INTERRUPTED" = 1 ] || break   # a trapped signal ends `wait` early: wait again for srun's own status
  done
  skipgpt_requeue_or_exit "$rc"
}
