"""Per-GPU memory of a SkipGPT training run: parameters, gradients, optimiser states, activations, buffers; fits?

    python tools/plan_memory.py llama2-13b --nodes 2 --gpus-per-node 8 --stage 1
    python tools/plan_memory.py llama3-70b --nodes 8 --stage 2 --lora-r 16 --seq-len 4096 --micro-batch 1
    python tools/plan_memory.py path/to/config.json --backend fsdp2 --no-activation-checkpointing --json

MODEL: a preset (llama2-7b, llama2-13b, llama2-70b, llama3-8b, llama3-70b, smollm2-135m), a config.json or a model
folder. The formulas are documented in skipgpt_dist/memory_plan.py.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipgpt_dist.errors import run_cli  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="preset name, config.json, or a model folder")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--backend", choices=["deepspeed", "fsdp2", "none"], default="deepspeed")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=3)
    p.add_argument("--offload", action="store_true", help="DeepSpeed ZeRO-3 offload of parameters and optimiser")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--stage", type=int, choices=[1, 2], default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-targets", default="q_proj,v_proj,gate_proj", help="comma-separated module names")
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--train-routers", action="store_true", help="stage 2: keep training the routers")
    p.add_argument("--router-type", choices=["linear", "mlp"], default="linear")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--mode", choices=["mask", "capacity", "expert_choice"], default="capacity")
    p.add_argument("--capacity", type=float, default=1.0)
    p.add_argument("--attn-impl", choices=["flash", "sdpa"], default="flash")
    p.add_argument("--overhead-gb", type=float, default=2.0, help="CUDA context + workspaces allowance, GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p.parse_args(argv)


@run_cli
def main(argv=None):
    args = parse_args(argv)
    from skipgpt_dist.memory_plan import ModelShape, Setup, format_plan, plan_memory

    setup = Setup(nodes=args.nodes, gpus_per_node=args.gpus_per_node, backend=args.backend,
                  zero_stage=args.zero_stage, offload=args.offload, seq_len=args.seq_len,
                  micro_batch=args.micro_batch, activation_checkpointing=args.activation_checkpointing,
                  stage=args.stage, lora_r=args.lora_r,
                  lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
                  lora_dropout=args.lora_dropout, train_routers=args.train_routers, router_type=args.router_type,
                  dtype=args.dtype, gpu_memory_gb=args.gpu_memory, mode=args.mode, capacity=args.capacity,
                  attn_impl=args.attn_impl, overhead_gb=args.overhead_gb)
    plan = plan_memory(ModelShape.load(args.model), setup)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))


if __name__ == "__main__":
    main()
