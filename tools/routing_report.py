"""Where a routed model skips: per-layer execute ratios and a per-token map, as report.png + report.json.

    python tools/routing_report.py exports/tiny-routed --text "To be, or not to be" --out reports/tiny
    python tools/routing_report.py runs/tiny --text-file prompt.txt --out reports/tiny --mode mask

MODEL is a folder exported by tools/merge_lora.py, or a training checkpoint / run folder (base + routers (+ LoRA)).
Under torchrun rank 0 makes the report (of one text: the other ranks would write the same files) and the others
exit at once.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipgpt_dist.errors import SkipGPTError, run_cli  # noqa: E402
from skipgpt_dist.placement import add_device_options  # noqa: E402


@run_cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="exported model folder, or a checkpoint / run folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to route")
    source.add_argument("--text-file", help="a UTF-8 file holding the text")
    parser.add_argument("--out", required=True, help="folder for report.png and report.json")
    parser.add_argument("--max-tokens", type=int, default=256, help="route at most this many tokens")
    parser.add_argument("--mode", choices=["mask", "capacity", "expert_choice"], default=None,
                        help="execution mode (default: the trained one)")
    parser.add_argument("--capacity", type=float, default=None)
    add_device_options(parser)
    args = parser.parse_args(argv)

    text = args.text
    if args.text_file is not None:
        try:
            with open(args.text_file, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as err:
            raise SkipGPTError(f"--text-file {args.text_file} cannot be read ({err}): give a UTF-8 text file")
    if not text or not text.strip():
        raise SkipGPTError("the text is empty: give a non-empty --text or --text-file")
    if args.max_tokens < 1:
        raise SkipGPTError(f"--max-tokens={args.max_tokens} must be >= 1")

    import torch

    from skipgpt_dist.placement import place_model, placement
    from skipgpt_dist.report import collect_routing, load_for_report, write_report
    from skipgpt_dist.training import distributed as D

    if D.rank() > 0:  # torchrun: one report, by rank 0
        return

    torch.manual_seed(0)
    device, device_map = placement(args)
    from safetensors import SafetensorError

    try:
        model, tokenizer = load_for_report(args.model, args.mode, args.capacity)
    except SafetensorError as err:  # an exported folder's weights (checkpoints are checked in training/restore.py)
        raise SkipGPTError(f"a safetensors file under {args.model} is not readable ({str(err).splitlines()[0][:160]}): "
                           "it is truncated or corrupt; export or copy it again") from None
    model = place_model(model, device, device_map)
    report = collect_routing(model, tokenizer, text, args.max_tokens)  # the ids follow the model
    report["model"] = args.model
    png, js = write_report(report, args.out)
    print(f"{report['num_tokens']} tokens, attention execute {report['attn_execute']:.3f}, MLP execute "
          f"{report['mlp_execute']:.3f}, sparsity {report['sparsity']:.3f}: wrote {png} and {js}", flush=True)


if __name__ == "__main__":
    main()
