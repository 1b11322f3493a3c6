"""Fold a stage-2 checkpoint's LoRA into the base weights: a self-contained routed model folder.

    python tools/merge_lora.py --checkpoint runs/tiny_stage2 --out exports/tiny-routed
    python tools/merge_lora.py --base builtin:smollm2-135m --checkpoint runs/smollm2_stage2/checkpoints/step_00000120 \
        --out exports/smollm2-routed --force

The checkpoint may come from any back end (one process, DeepSpeed ZeRO, FSDP2/DCP). The output holds HF safetensors
shards + model.safetensors.index.json (same sharding as the base), routers.safetensors, config.json with a
`skipgpt` section, generation_config.json and the tokenizer. It streams shard by shard (memory ~ one shard + the
adapters) and appears atomically; an existing --out is replaced only with --force.

Load it with skipgpt_dist.load_routed_model(OUT) (routed) or transformers.AutoModelForCausalLM.from_pretrained(OUT)
(dense).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipgpt_dist.errors import run_cli  # noqa: E402


@run_cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="stage-2 checkpoint folder, or a run folder (its latest)")
    parser.add_argument("--base", default=None,
                        help="base model folder or builtin:NAME (default: model.path of the checkpoint's config.yaml)")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out (atomically)")
    args = parser.parse_args(argv)

    from skipgpt_dist.export import merge_lora

    merge_lora(args.checkpoint, args.out, base=args.base, force=args.force)


if __name__ == "__main__":
    main()
