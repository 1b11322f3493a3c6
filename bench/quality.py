"""SkipGPT against static pruning on a real model: the paper's table in miniature.

On SmolLM2-135M and Shakespeare (train plays -> held-out plays), perplexity of
- the dense model;
- ShortGPT static pruning at the same sublayer sparsity: the whole layers with the lowest block influence dropped,
  and (the strongest static baseline for attention) attention sublayers only;
- SkipGPT stage 1 (routers tuned, base frozen) and stage 1 + LoRA stage 2,
each at 25% and 40% sparsity. Sparsity is the fraction of sublayer executions skipped (attention and MLP counted
alike, as in the paper); the table also gives the fraction of the decoder's matmul FLOPs skipped.

    python bench/quality.py                  # full: SmolLM2-135M, both sparsities (under an hour on 2 CPU cores)
    python bench/quality.py --quick          # smoke run on the builtin tiny model (about a minute)
    python bench/quality.py --out runs/quality --sparsities 0.25

Writes OUT/quality.md (the table and the training budget), OUT/quality.json and OUT/quality.png, and prints the
table. Every training run is an ordinary train.py run folder under OUT (config.yaml, metrics.jsonl, checkpoints).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from skipgpt_dist.errors import SkipGPTError, run_cli  # noqa: E402


@dataclass
class Preset:
    stage1_config: str
    stage2_config: str
    common: list[str]  # overrides of both stages (data and eval sizes)
    stage1: list[str]  # the stage-1 recipe
    stage2: list[str]
    calibration_sequences: int


PRESETS = {
    "full": Preset(
        stage1_config="configs/smollm2_stage1.yaml", stage2_config="configs/smollm2_stage2.yaml",
        common=["data.seq_len=256", "data.eval_sequences=32", "checkpoint.every_steps=0", "logging.progress=true"],
        stage1=["optim.max_steps=60", "optim.lr=1e-3", "routers.init_margin=5", "routers.init=block_influence"],
        stage2=["optim.max_steps=120", "optim.lr=2e-3", "routers.mode=mask", "stage.train_routers=true"],
        calibration_sequences=16),
    "quick": Preset(
        stage1_config="configs/tiny.yaml", stage2_config="configs/tiny_stage2.yaml",
        common=["data.seq_len=64", "data.eval_sequences=4", "checkpoint.every_steps=0", "logging.progress=false"],
        stage1=["optim.max_steps=4", "routers.mode=mask", "routers.init_margin=5", "routers.init=block_influence"],
        stage2=["optim.max_steps=3", "routers.mode=mask", "stage.lora.r=4", "stage.train_routers=true"],
        calibration_sequences=4),
}


@dataclass
class Row:
    method: str
    target: float | None
    ppl: float
    attn_sparsity: float
    mlp_sparsity: float
    flops_skipped: float
    ppl_routing_off: float  # the same weights with every sublayer executed (after LoRA: the fine-tuned dense model)
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return (self.attn_sparsity + self.mlp_sparsity) / 2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny builtin model, a few steps (smoke test)")
    p.add_argument("--out", default=None, help="output folder (default runs/quality or runs/quality-quick)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.40])
    p.add_argument("--stage1-steps", type=int, default=None, help="override the preset's stage-1 steps")
    p.add_argument("--stage2-steps", type=int, default=None, help="override the preset's stage-2 steps")
    p.add_argument("--skip-training", action="store_true", help="only dense and the static baselines")
    args = p.parse_args(argv)
    for s in args.sparsities:
        if not 0.0 < s < 1.0:
            raise SkipGPTError(f"--sparsities {s} is out of range: use fractions in (0, 1), e.g. 0.25 0.40")
    return args


# ---------------------------------------------------------------- FLOPs


def sublayer_flops(model_config) -> tuple[float, float]:
    """Per-token matmul FLOPs of one attention and one MLP sublayer (projections only; the attention score term
    depends on the sequence length and is small at these lengths)."""
    d = model_config.hidden_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", heads) or heads
    head_dim = getattr(model_config, "head_dim", None) or d // heads
    attn = 2 * (2 * d * heads * head_dim + 2 * d * kv * head_dim)
    mlp = 2 * 3 * d * model_config.intermediate_size
    return float(attn), float(mlp)


def flops_skipped(attn_sparsity: float, mlp_sparsity: float, flops: tuple[float, float]) -> float:
    attn, mlp = flops
    return (attn_sparsity * attn + mlp_sparsity * mlp) / (attn + mlp)


# ---------------------------------------------------------------- dense and static baselines


def static_rows(preset: Preset, sparsities, out: Path) -> tuple[list[Row], float, tuple[float, float]]:
    """Dense perplexity and ShortGPT baselines, all with the routed model's own evaluation."""
    from skipgpt_dist.config import load_config
    from skipgpt_dist.static_pruning import (attention_drop_plan, block_influence, layer_drop_plan,
                                             set_static_routing)
    from skipgpt_dist.training.evaluate import evaluate
    from skipgpt_dist.training.loop import build_data
    from skipgpt_dist.training.model_setup import build_model

    cfg = load_config(str(ROOT / preset.stage1_config), preset.common + ["routers.mode=mask", f"run_dir={out}/static"])
    model, tokenizer, _ = build_model(cfg)
    batches, held_out = build_data(cfg, tokenizer)
    calibration = batches.peek_sequences(preset.calibration_sequences)
    flops = sublayer_flops(model.config)
    log(f"block influence on {len(calibration)} training sequences")
    influence = block_influence(model, calibration, cfg.optim.micro_batch_size)
    rows, dense_ppl = [], None
    for sparsity in sparsities:
        for method, plan in (("ShortGPT layer drop", layer_drop_plan), ("ShortGPT attention drop", attention_drop_plan)):
            attn_skip, mlp_skip = plan(influence, sparsity)
            set_static_routing(model, attn_skip, mlp_skip)
            result = evaluate(model, held_out, cfg.optim.micro_batch_size)
            dense_ppl = result["ppl_dense"]
            rows.append(Row(method, sparsity, result["ppl_routed"], result["attn_sparsity"], result["mlp_sparsity"],
                            flops_skipped(result["attn_sparsity"], result["mlp_sparsity"], flops), dense_ppl,
                            note=f"attn {attn_skip} mlp {mlp_skip}"))
            log(f"{method} @ {sparsity:.0%}: ppl {rows[-1].ppl:.2f}")
    rows += oracle_rows(model, calibration, held_out, sparsities, cfg.optim.micro_batch_size, dense_ppl, flops)
    (out / "block_influence.json").write_text(json.dumps({"layer": influence.layer, "attn": influence.attn}) + "\n")
    return rows, dense_ppl, flops


ORACLE = "Output-norm oracle (reference)"


def oracle_rows(model, calibration, held_out, sparsities, micro_batch_size: int, dense_ppl: float, flops):
    """bench/norm_oracle.py at each sparsity: threshold tuned on the training sequences, scored on held-out."""
    from bench.norm_oracle import NormOracle

    oracle, rows = NormOracle(model), []
    for sparsity in sparsities:
        oracle.calibrate(calibration, sparsity, micro_batch_size)
        ppl = oracle.perplexity(held_out, micro_batch_size)
        attn, mlp = oracle.sparsity()
        rows.append(Row(ORACLE, sparsity, ppl, attn, mlp, flops_skipped(attn, mlp, flops), dense_ppl,
                        note=f"threshold {oracle.threshold:.4g}; runs every sublayer (decides from its output)"))
        log(f"{ORACLE} @ {sparsity:.0%}: ppl {ppl:.2f} at {(attn + mlp) / 2:.3f}")
    return rows


# ---------------------------------------------------------------- SkipGPT training


def train_stage(config: str, overrides: list[str]) -> dict:
    """One train.py run in this process; returns its final evaluation and wall time."""
    from skipgpt_dist.config import load_config
    from skipgpt_dist.training.loop import run

    cfg = load_config(str(ROOT / config), overrides)
    start = time.perf_counter()
    result = run(cfg)
    if result.final_eval is None:
        raise SkipGPTError(f"{cfg.run_dir}: the run ended without a final evaluation")
    tokens = cfg.optim.max_steps * cfg.global_batch_size(1) * cfg.data.seq_len
    return {"eval": result.final_eval, "seconds": time.perf_counter() - start, "steps": cfg.optim.max_steps,
            "tokens": tokens, "run_dir": cfg.run_dir}


def kind_targets(sparsity: float, attn_share: float, attn_cap: float) -> tuple[float, float]:
    """(attention, MLP) targets with the given mean: attention takes attn_share of the skipping, up to attn_cap of
    its executions, the MLP the rest. Attention is the more redundant kind (the paper's finding, and SmolLM2-135M's:
    its block influence is ~10x lower than the MLP's), and MLP skipping costs this small model the most."""
    attn = min(attn_cap, 2 * attn_share * sparsity)
    return round(attn, 4), round(2 * sparsity - attn, 4)


# Stage 1: 90% of the skipping on attention (sampled gates still explore the MLPs). Stage 2, whose routers keep
# training beside LoRA with deterministic gates: the calibrated stage-1 routers skip attention only, so it holds
# the whole mean on attention, up to 75% of it.
STAGE1_SPLIT, STAGE2_SPLIT = dict(attn_share=0.9, attn_cap=0.9), dict(attn_share=1.0, attn_cap=0.75)


def calibrate(stage1_dir: Path, out: Path, sparsity: float, sequences: int) -> dict:
    """tools/calibrate_routers.py on the stage-1 run; the held-out evaluation of the calibrated routers."""
    from skipgpt_dist.training.evaluate import evaluate
    from skipgpt_dist.training.loop import build_data
    from tools.calibrate_routers import calibrate_checkpoint

    start = time.perf_counter()
    # attention routers only: the MLP routers of this small model learn to skip almost no MLP at evaluation, and
    # forcing MLP skips by threshold costs far more than skipping more attention (README, Quality)
    model, tokenizer, cfg, _ = calibrate_checkpoint(stage1_dir, out, sparsity, "per_layer", None, sequences, "attn")
    held_out = build_data(cfg, tokenizer)[1]
    return {"eval": evaluate(model, held_out, cfg.optim.micro_batch_size), "seconds": time.perf_counter() - start,
            "steps": 0, "tokens": sequences * cfg.data.seq_len, "run_dir": str(out)}


def skipgpt_rows(preset: Preset, args, sparsity: float, out: Path, flops) -> tuple[list[Row], list[dict]]:
    tag = f"{round(sparsity * 100)}"
    stage1 = preset.stage1 + ([f"optim.max_steps={args.stage1_steps}"] if args.stage1_steps else [])
    stage2 = preset.stage2 + ([f"optim.max_steps={args.stage2_steps}"] if args.stage2_steps else [])
    s1_dir, cal_dir, s2_dir = out / f"stage1_{tag}", out / f"stage1_{tag}_calibrated", out / f"stage2_{tag}"
    log(f"SkipGPT stage 1 @ {sparsity:.0%} -> {s1_dir}")
    attn, mlp = kind_targets(sparsity, **STAGE1_SPLIT)
    s1 = train_stage(preset.stage1_config, preset.common + stage1 + [
        f"routers.target_sparsity={sparsity}", f"routers.target_sparsity_attn={attn}",
        f"routers.target_sparsity_mlp={mlp}", f"run_dir={s1_dir}", "checkpoint.resume=never"])
    log(f"calibrating stage-1 routers to {sparsity:.0%} -> {cal_dir}")
    cal = calibrate(s1_dir, cal_dir, sparsity, preset.calibration_sequences)
    log(f"SkipGPT stage 2 (LoRA) @ {sparsity:.0%} -> {s2_dir}")
    attn2, mlp2 = kind_targets(sparsity, **STAGE2_SPLIT)
    s2 = train_stage(preset.stage2_config, preset.common + stage2 + [
        f"routers.target_sparsity={sparsity}", f"routers.target_sparsity_attn={attn2}",
        f"routers.target_sparsity_mlp={mlp2}", f"stage.init_from={cal_dir}", f"run_dir={s2_dir}",
        "checkpoint.resume=never"])
    rows = []
    for method, run in (("SkipGPT stage 1 (routers)", s1), ("SkipGPT stage 1, calibrated", cal),
                        ("SkipGPT stage 1 + 2 (LoRA)", s2)):
        e = run["eval"]
        rows.append(Row(method, sparsity, e["ppl_routed"], e["attn_sparsity"], e["mlp_sparsity"],
                        flops_skipped(e["attn_sparsity"], e["mlp_sparsity"], flops), e["ppl_dense"],
                        extra={"steps": run["steps"], "tokens": run["tokens"], "seconds": run["seconds"]}))
    return rows, [s1, s2]


# ---------------------------------------------------------------- report


def table(rows: list[Row], dense_ppl: float) -> str:
    # x dense: against the base model. x routing off: against the same weights with every sublayer executed, which
    # after LoRA is the fine-tuned dense model (LoRA on the training plays also adapts the model to Shakespeare).
    lines = ["| method | target | sparsity (attn / mlp) | FLOPs skipped | ppl | x dense | x routing off |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| dense | - | 0.000 (0.000 / 0.000) | 0.000 | {dense_ppl:.2f} | 1.000 | 1.000 |"]
    for r in rows:
        lines.append(f"| {r.method} | {r.target:.0%} | {r.sparsity:.3f} ({r.attn_sparsity:.3f} / "
                     f"{r.mlp_sparsity:.3f}) | {r.flops_skipped:.3f} | {r.ppl:.2f} | {r.ppl / dense_ppl:.3f} | "
                     f"{r.ppl / r.ppl_routing_off:.3f} |")
    return "\n".join(lines)


def budget_lines(runs: list[dict]) -> str:
    if not runs:
        return "No SkipGPT training in this run (--skip-training)."
    return "\n".join(f"- `{r['run_dir']}`: {r['steps']} steps, {r['tokens']:,} tokens, {r['seconds'] / 60:.1f} min"
                     for r in runs)


def plot(rows: list[Row], dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in dict.fromkeys(r.method for r in rows):
        pts = sorted((r.sparsity, r.ppl / dense_ppl) for r in rows if r.method == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sublayer sparsity (fraction of executions skipped)")
    ax.set_ylabel("perplexity / dense (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


@run_cli
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    preset = PRESETS["quick" if args.quick else "full"]
    out = Path(args.out or ROOT / ("runs/quality-quick" if args.quick else "runs/quality")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows, dense_ppl, flops = static_rows(preset, args.sparsities, out)
    runs = []
    if not args.skip_training:
        for sparsity in args.sparsities:
            new_rows, new_runs = skipgpt_rows(preset, args, sparsity, out, flops)
            rows += new_rows
            runs += new_runs
    order = ["ShortGPT layer drop", "ShortGPT attention drop", ORACLE, "SkipGPT stage 1 (routers)",
             "SkipGPT stage 1, calibrated", "SkipGPT stage 1 + 2 (LoRA)"]
    rows.sort(key=lambda r: (r.target, order.index(r.method)))
    text = table(rows, dense_ppl)
    minutes = (time.perf_counter() - start) / 60
    report = (f"# SkipGPT vs static pruning ({'quick' if args.quick else 'full'})\n\n{text}\n\n"
              f"Training budget:\n{budget_lines(runs)}\n\nTotal wall time {minutes:.1f} min "
              f"on {torch.get_num_threads()} threads.\n")
    (out / "quality.md").write_text(report)
    (out / "quality.json").write_text(json.dumps({
        "dense_ppl": dense_ppl, "rows": [{**r.__dict__, "sparsity": r.sparsity} for r in rows],
        "runs": [{k: v for k, v in r.items() if k != "eval"} | {"eval": r["eval"]} for r in runs],
        "minutes": minutes}, indent=2, default=str) + "\n")
    plot(rows, dense_ppl, out / "quality.png")
    print(report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
