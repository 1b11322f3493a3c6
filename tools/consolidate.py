"""One safetensors file from a checkpoint of any back end (one process, DeepSpeed ZeRO-2/3, FSDP2 DCP).

    python tools/consolidate.py runs/tiny_z3/checkpoints/step_00000010 --out tiny_z3.safetensors
    python tools/consolidate.py runs/tiny_stage2 --out lora_and_routers.safetensors --trainable-only

Keys are those of the state_dict of the model train.py trains (stage 2: the peft model, so LoRA-adapted base weights
sit under `.base_layer.`); tied duplicates are stored once. Full (default): the base weights, read shard by shard
from the base model folder (model.path of the checkpoint's config.yaml, or --base) + the routers + LoRA.
--trainable-only: only what training produced (routers and LoRA). Trained tensors are read from the engine's own
files (fp32 masters), falling back to the portable routers.safetensors / adapter/ when the engine stored none.
The engine's files that hold pickles (DCP dcp/.metadata, DeepSpeed deepspeed/*_states.pt) are checked against the
sizes and sha256 recorded in the checkpoint's trainer_state.json before anything reads them: a damaged or replaced
file is a one-line error, never unpickled.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipgpt_dist.errors import run_cli  # noqa: E402


@run_cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="output .safetensors file (must not exist unless --force)")
    parser.add_argument("--trainable-only", action="store_true", help="only routers and LoRA, no base weights")
    parser.add_argument("--base", default=None, help="base model folder or builtin:NAME (default: from config.yaml)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out (atomically)")
    args = parser.parse_args(argv)

    from skipgpt_dist.export import consolidate

    consolidate(args.checkpoint, args.out, trainable_only=args.trainable_only, force=args.force, base=args.base)


if __name__ == "__main__":
    main()
