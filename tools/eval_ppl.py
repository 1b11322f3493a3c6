"""Perplexity of a trained routed model vs the same model with routers off, plus the achieved sparsity.

    python tools/eval_ppl.py runs/tiny --data builtin:shakespeare-eval
    python tools/eval_ppl.py runs/smollm2_stage1/checkpoints/step_00000060 --data my_eval.jsonl --sequences 32

Prints one JSON line: {"ppl_routed", "ppl_dense", "ppl_ratio", "attn_sparsity", "mlp_sparsity", "sparsity", ...}.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipgpt_dist.errors import SkipGPTError, run_cli  # noqa: E402


@run_cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder or a run folder (its latest checkpoint)")
    parser.add_argument("--data", nargs="+", default=["builtin:shakespeare-eval"],
                        help="eval text: .txt/.jsonl/.parquet files, a datasets folder, or builtin:shakespeare-eval")
    parser.add_argument("--sequences", type=int, default=16, help="number of packed sequences to score")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the training one)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mode", choices=["mask", "capacity", "expert_choice"], default=None,
                        help="execution mode to evaluate with (default: the trained one)")
    parser.add_argument("--capacity", type=float, default=None)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise SkipGPTError(f"--batch-size={args.batch_size} must be >= 1")
    if args.sequences < 1:
        raise SkipGPTError(f"--sequences={args.sequences} must be >= 1")
    if args.seq_len is not None and args.seq_len < 2:
        raise SkipGPTError(f"--seq-len={args.seq_len} must be >= 2: a sequence needs a token to predict the next from")

    import torch

    from skipgpt_dist.data import packed_eval_sequences
    from skipgpt_dist.training.evaluate import evaluate
    from skipgpt_dist.training.restore import load_checkpoint_model

    torch.manual_seed(0)
    model, tokenizer, cfg = load_checkpoint_model(args.checkpoint, args.mode, args.capacity)
    seq_len = args.seq_len or cfg.data.seq_len
    held_out = packed_eval_sequences(args.data, tokenizer, seq_len, args.sequences, text_field=cfg.data.text_field,
                                     at_most=True)
    result = evaluate(model, held_out, args.batch_size)
    result["ppl_ratio"] = result["ppl_routed"] / result["ppl_dense"]
    result.update(checkpoint=args.checkpoint, seq_len=seq_len)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
