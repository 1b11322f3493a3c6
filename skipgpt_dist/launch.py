"""Run training on Slurm: submit through submitit, and the per-node launcher that slurm/*.sh use.

    python -m skipgpt_dist.launch --nodes 2 --config configs/tiny.yaml [--wait] [key=value ...]
        Submit one training job with submitit (for users who script sweeps; `submit()` is the Python API).
        Every node runs one launcher (below) that starts --gpus-per-node ranks (or --cpu-ranks-per-node on CPU).
    python -m skipgpt_dist.launch torchrun [torchrun arguments] train.py [train.py arguments]
        The per-node launcher: torchrun (the same arguments, the same elastic agent) that passes the training
        ranks' exit code 75 through (a checkpoint was saved on a stop signal: requeue and resume) instead of
        torchrun's blanket 1, and that leaves SIGUSR1 / SIGTERM to the ranks, whose loop checkpoints and stops.
    python -m skipgpt_dist.launch preflight [--config C] [--ds_config J] [--world-size N] [key=value ...]
        Check a run's inputs in seconds, before any node starts: config, model folder, data files, the
        stage-1 checkpoint of stage 2, the DeepSpeed JSON. One line and exit 2 on the first problem.
    python -m skipgpt_dist.launch after-srun --rc RC [--log LOG --log-offset N] [--stop USR1] --run-dir D ...
        slurm/common.sh's decision after a failed srun step: classify_failure() (preempted | infra | user) and
        requeue_decision() (MAX_REQUEUES, progress since the last infrastructure requeue); appends the decision
        to RUN_DIR/requeues.log and prints `requeue|exit KIND REASON`.

The rendezvous is computed the same way here and in slurm/common.sh: the first host of
`scontrol show hostnames $SLURM_JOB_NODELIST`, port 29500 + job id mod 10000, c10d, id = the job id.

The pieces: node_launcher.py (rendezvous, node environment, torchrun), requeue.py (after-srun), preflight.py,
slurm_submit.py (submitit); their public names are importable from here too.
"""
from __future__ import annotations

import argparse
import sys

from .errors import SkipGPTError, run_cli
from .node_launcher import (PREEMPTED_EXIT_CODE, REPO, STOP_SIGNALS, TRAIN_PY, StopForwarder,  # noqa: F401
                            _failure_exit_code, log, node_environment, rendezvous_port, slurm_hostnames, torchrun,
                            torchrun_args)
from .preflight import load_run_config, preflight, preflight_main  # noqa: F401
from .requeue import (INFRA_PATTERNS, INFRA_SIGNALS, REQUEUE_LOG, after_srun_main, classify_failure,  # noqa: F401
                      latest_checkpoint_step, requeue_decision)
from .slurm_submit import (FINISHED_STATES, NodeTask, SlurmOptions, slurm_job_state, submit,  # noqa: F401
                           wait_for)


def submit_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m skipgpt_dist.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training YAML (configs/...)")
    parser.add_argument("--ds_config", help="DeepSpeed JSON; implies --backend deepspeed")
    parser.add_argument("--backend", default="fsdp2", choices=["fsdp2", "deepspeed", "none"])
    parser.add_argument("--output", help="output folder (default runs/JOB_NAME): the run in OUTPUT/stage<N>, "
                        "submitit's logs in OUTPUT/logs/submitit")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU ranks with gloo")
    parser.add_argument("--cpu-ranks-per-node", type=int, default=1)
    parser.add_argument("--partition")
    parser.add_argument("--time", type=int, default=60, help="time limit in minutes")
    parser.add_argument("--cpus-per-node", type=int)
    parser.add_argument("--mem")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--exclusive", action="store_true")
    parser.add_argument("--job-name", default="skipgpt")
    parser.add_argument("--signal-delay", type=int, default=300, help="seconds before the time limit for USR1")
    parser.add_argument("--max-requeues", type=int, default=20)
    parser.add_argument("--wait", action="store_true", help="wait for the job; exit 0 only if it succeeded")
    parser.add_argument("overrides", nargs="*", help="config overrides such as optim.max_steps=100")
    args = parser.parse_args(argv)
    if args.signal_delay >= args.time * 60:
        raise SkipGPTError(f"--signal-delay={args.signal_delay} s is not shorter than --time={args.time} min: "
                           "lower --signal-delay or raise --time")
    for name in ("nodes", "gpus_per_node", "cpu_ranks_per_node", "time"):
        if getattr(args, name) < (0 if name == "gpus_per_node" else 1):
            raise SkipGPTError(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range")
    opts = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        cpu_ranks_per_node=args.cpu_ranks_per_node, partition=args.partition, time_min=args.time,
                        cpus_per_node=args.cpus_per_node, mem=args.mem, account=args.account, qos=args.qos,
                        exclusive=args.exclusive, job_name=args.job_name, signal_delay_s=args.signal_delay,
                        max_requeues=args.max_requeues)
    job = submit(args.config, args.overrides, output=args.output, backend=args.backend, ds_config=args.ds_config,
                 slurm=opts)
    print(f"submitted job {job.job_id}: log {job.paths.stdout}", flush=True)
    if not args.wait:
        return 0
    wait_for(job)
    try:
        job.results()
    except Exception as err:  # submitit's FailedJobError / UncompletedJobError carry the remote traceback
        lines = [line for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise SkipGPTError(f"job {job.job_id} failed ({reason.strip()[:300]}): see {job.paths.stdout}") from None
    print(f"job {job.job_id} completed", flush=True)
    return 0


@run_cli
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["torchrun"]:
        return torchrun(argv[1:])
    if argv[:1] == ["preflight"]:
        return preflight_main(argv[1:])
    if argv[:1] == ["after-srun"]:
        return after_srun_main(argv[1:])
    return submit_main(argv)


if __name__ == "__main__":
    sys.exit(main())
