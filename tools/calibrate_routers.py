"""Calibrate a stage-1 checkpoint's routers so that evaluation skips as much as training did (or a new target).

    python tools/calibrate_routers.py runs/smollm2_stage1 --out runs/smollm2_stage1_cal
    python tools/calibrate_routers.py runs/smollm2_stage1 --out runs/cal40 --sparsity 0.40 --method global
    python train.py --config configs/smollm2_stage2.yaml stage.init_from=runs/smollm2_stage1_cal

Sampled training gates skip a token with probability sigmoid(-margin); evaluation skips iff margin < 0, so after a
short stage 1 the evaluated model skips less than the target. Calibration shifts each router's bias (nothing
else) so that, on training text, the tokens with the lowest margins skip (skipgpt_dist/routing/calibrate.py).

The output is a copy of the checkpoint with the new routers.safetensors, usable wherever a checkpoint is
(stage.init_from, tools/eval_ppl.py, tools/merge_lora.py). The input is never modified; an existing --out is
refused. Prints one JSON line: skip rates before, and ppl / sparsity after on --eval-data.

    torchrun --nproc_per_node 4 tools/calibrate_routers.py runs/smollm2_stage1 --out runs/cal --sequences 256

Under torchrun every rank holds the whole model on its own device and collects the router margins of its share of
the calibration sequences; the margins are gathered, so every rank computes the same shifts as one process, rank 0
writes the copy, and the held-out line is scored over all ranks (as tools/eval_ppl.py does).
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipgpt_dist.errors import SkipGPTError, run_cli  # noqa: E402
from skipgpt_dist.placement import add_device_options  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a stage-1 checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, help="new checkpoint folder to write (must not exist)")
    p.add_argument("--sparsity", type=float, default=None, help="target (default: the trained routers.target_sparsity)")
    p.add_argument("--method", choices=["per_layer", "global"], default="per_layer",
                   help="per_layer: keep each layer's trained skip rate, rescaled; global: one threshold")
    p.add_argument("--kinds", choices=["both", "attn", "mlp"], default="both",
                   help="routers to move: both, or one kind only (it meets the overall target, the other stays)")
    p.add_argument("--data", nargs="+", default=None, help="calibration text (default: the run's data.train_files)")
    p.add_argument("--sequences", type=int, default=16, help="calibration sequences")
    p.add_argument("--eval-data", nargs="+", default=None, help="held-out text for the ppl line (default: the run's)")
    add_device_options(p)
    return p.parse_args(argv)


def calibrate_checkpoint(checkpoint, out, device, sparsity=None, method="per_layer", data=None, sequences=16,
                         kinds="both", device_map=None):
    """Write `out`, a copy of `checkpoint` with calibrated routers; returns (model, tokenizer, cfg, skip rates
    before calibration). The model is the calibrated one, in eval mode, on `device` (placement()'s), or split by
    `device_map` (placement.read_device_map's). The calibration is routing/calibrate.py's, the code
    stage.calibrate runs inside training."""
    out = Path(out).expanduser()
    if out.exists():
        raise SkipGPTError(f"--out {out} already exists: choose a new folder (the calibrated copy never overwrites)")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise SkipGPTError(f"--sparsity {sparsity} is out of range: use a fraction in [0, 1), e.g. 0.25")

    from skipgpt_dist.checkpoint import find_checkpoint
    from skipgpt_dist.data import packed_eval_sequences
    from skipgpt_dist.placement import place_model
    from skipgpt_dist.routing import routing_context
    from skipgpt_dist.routing.calibrate import calibrate_routers
    from skipgpt_dist.training import distributed as D
    from skipgpt_dist.training.restore import load_checkpoint_model

    source = find_checkpoint(checkpoint, key="checkpoint")
    D.join_tool_ranks(device)  # after every rank checked --out: none can be written before all have joined
    model, tokenizer, cfg = load_checkpoint_model(str(source))
    model = place_model(model, device, device_map)
    router_cfg = routing_context(model).cfg
    if sparsity is not None:
        router_cfg.target_sparsity = sparsity
        router_cfg.target_sparsity_attn = router_cfg.target_sparsity_mlp = None
    # the run's own files are read as the run read them; --data files by their extension
    with D.main_rank_first():
        calibration = packed_eval_sequences(data or cfg.data.train_files, tokenizer, cfg.data.seq_len, sequences,
                                            "auto" if data else cfg.data.format, cfg.data.text_field)
    # every rank collects its share of the margins and gets the same shifts (routing/calibrate.py gathers them)
    before = calibrate_routers(model, calibration, method=method, micro_batch_size=cfg.optim.micro_batch_size,
                               kinds=("attn", "mlp") if kinds == "both" else (kinds,))
    if D.is_main():
        write_calibrated_copy(model, source, out)
    D.barrier()
    return model, tokenizer, cfg, before


def write_calibrated_copy(model, source, out):
    """`source` copied to `out` with the model's routers, atomically (a temporary folder renamed at the end)."""
    from skipgpt_dist.checkpoint import ROUTERS_FILE, record_files, verify_checkpoint
    from skipgpt_dist.routing import save_routers

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        shutil.copytree(source, tmp)
        save_routers(model, tmp / ROUTERS_FILE)
        if verify_checkpoint(source) is None:  # a verified source gives a verified copy (resumable); never launder
            record_files(tmp)                  # a damaged one by re-hashing it
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@run_cli
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from skipgpt_dist.placement import placement
    from skipgpt_dist.routing import routing_context
    from skipgpt_dist.training import distributed as D
    from skipgpt_dist.training.evaluate import score_text

    torch.manual_seed(0)
    device, device_map = placement(args)
    model, tokenizer, cfg, before = calibrate_checkpoint(args.checkpoint, args.out, device, args.sparsity,
                                                         args.method, args.data, args.sequences, args.kinds,
                                                         device_map)
    result = {"checkpoint": str(args.out), "method": args.method, "kinds": args.kinds,
              "target_sparsity": routing_context(model).cfg.target_sparsity, "skip_rate_before": before}
    eval_data = args.eval_data or cfg.data.eval_files
    if eval_data:  # (a run without held-out files gets the skip rates only); each rank its share, all-reduced
        result.update(score_text(model, tokenizer, eval_data, cfg.data.seq_len, cfg.data.eval_sequences,
                                 cfg.optim.micro_batch_size, cfg.data.text_field,
                                 "auto" if args.eval_data else cfg.data.format, at_most=False))
    if D.is_main():
        print(json.dumps(result), flush=True)
    D.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
