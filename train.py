"""Train SkipGPT routers (stage 1) or LoRA (stage 2).

    python train.py --config configs/tiny.yaml [key.sub=value ...]
    torchrun --nproc_per_node N train.py --config ... parallel.backend=fsdp2
    deepspeed --num_gpus N train.py --ds_config ds_configs/zero3.json --config ...
"""
import argparse
import os
import sys

from skipgpt_dist.errors import run_cli

# The embedded default: SmolLM2-135M routers on Shakespeare, a few minutes on CPU.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "smollm2_stage1.yaml")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML config (see configs/; default: the SmolLM2-135M demo, configs/smollm2_stage1.yaml)")
    parser.add_argument("--ds_config", help="DeepSpeed JSON; implies parallel.backend=deepspeed")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides such as optim.lr=3e-4 routers.capacity=0.75")
    return parser.parse_args(argv)


@run_cli
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from skipgpt_dist.config import load_config
    from skipgpt_dist.training.loop import PREEMPTED_EXIT_CODE, run

    overrides = list(args.overrides)
    if args.ds_config:
        overrides += ["parallel.backend=deepspeed", f"parallel.ds_config={args.ds_config}"]
    result = run(load_config(args.config, overrides, for_training=True))
    from skipgpt_dist.training.backends import exit_process
    from skipgpt_dist.training.distributed import is_main

    if result.final_eval is not None and is_main():
        e = result.final_eval
        print(f"final: ppl dense {e['ppl_dense']:.2f} routed {e['ppl_routed']:.2f} "
              f"(x{e['ppl_routed'] / e['ppl_dense']:.3f}) sparsity attn {e['attn_sparsity']:.3f} "
              f"mlp {e['mlp_sparsity']:.3f} overall {e['sparsity']:.3f}", flush=True)
    return exit_process(PREEMPTED_EXIT_CODE if result.preempted else 0)


if __name__ == "__main__":
    sys.exit(main())
