"""Shaping a fresh run's routers on the engine's model, on every rank of every back end:
routers.init=block_influence (stage 1: warm start from a ShortGPT ranking of the sublayers) and stage.calibrate
(stage 2: shift the loaded stage-1 routers so that deterministic gates skip as training did).

Both run after the engine is built (on the FSDP2-sharded model or the DeepSpeed engine's module: the forwards
gather the parameters as in training) and only on a fresh run: a resumed run has its routers from the checkpoint.
Every rank reads the same calibration sequences, those of the global stream, runs its share of them, and gets the
gathered statistics (routing/calibrate.sequence_records), so every rank writes the same router values
(Engine.writable) and N ranks start where one process starts.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import ROUTERS_FILE
from ..data import PackedBatches
from ..routing import inference_slots, routed_layers
from ..routing.api import ROUTER_NAMES, set_layer_capacity
from ..routing.calibrate import KINDS, calibrate_routers, collect_margins, skip_rates
from ..routing.capacity_plan import describe_capacity, warm_start_capacity
from ..static_pruning import block_influence, init_routers_from_influence
from . import distributed as D
from .model_setup import saved_router_config
from .reporting import log

CALIBRATION_SEQUENCES = 16
INFLUENCE_FILE = "block_influence.json"


def calibration_sequences(batches: PackedBatches, count: int):
    """The next `count` sequences of the global stream (what one process with the same global batch reads next),
    the same on every rank; the data position is left where it was."""
    view = PackedBatches(batches.packed, batches.micro_batch_size * batches.world_size, batches.grad_accum_steps,
                         1, 0, batches.seed)
    view.load_state_dict(batches.state_dict())
    return view.peek_sequences(count)


def router_biases(model) -> list:
    """The parameters warm start and calibration write: each router's last bias (the [execute, skip] offset)."""
    return [getattr(layer, name).last_linear.bias for layer in routed_layers(model) for name in ROUTER_NAMES]


def warm_start_routers(cfg, engine, batches) -> tuple[list[int], list[int]] | None:
    """Stage 1 with routers.init=block_influence, fresh runs: rank the sublayers by block influence on a few
    sequences of the training stream and set the router biases (static_pruning.init_routers_from_influence).
    Returns the marked (attention, MLP) layer indices, or None when there is no warm start. Every rank calls it."""
    routers = cfg.routers
    if cfg.stage.stage != 1 or routers.init != "block_influence":
        return None
    model = engine.model
    influence = block_influence(model, calibration_sequences(batches, CALIBRATION_SEQUENCES),
                                cfg.optim.micro_batch_size)
    with engine.writable(router_biases(model)):
        attn, mlp = init_routers_from_influence(model, influence, routers.warm_start_fractions(),
                                                routers.init_margin, routers.init_skip_margin)
    log(f"routers warm-started from block influence: attention layers {attn} and MLP layers {mlp} start at "
        f"margin {routers.init_skip_margin}, the rest at {routers.init_margin}")
    write_influence(cfg.run_dir, influence, attn, mlp)
    if routers.capacity_plan == "warm_start":  # the marked sublayers get few slots, the rest every slot
        plan = warm_start_capacity(len(influence.attn), attn, mlp, routers.marked_capacities())
        set_layer_capacity(model, plan)
        log(describe_capacity(plan))
    return attn, mlp


def write_influence(run_dir: str, influence, attn: list[int], mlp: list[int]) -> None:
    """run_dir/block_influence.json (rank 0): the scores and the marked layers, for the record and the tests."""
    if D.is_main():
        record = {"layer": influence.layer, "attn": influence.attn, "mlp": influence.mlp,
                  "marked": {"attn": attn, "mlp": mlp}}
        (Path(run_dir) / INFLUENCE_FILE).write_text(json.dumps(record) + "\n")


def restore_warm_start(cfg, model, checkpoint: Path) -> None:
    """A resumed stage-1 run keeps the capacity plan its warm start made (saved with the checkpoint's routers)
    instead of warm-starting again over the routers it loaded."""
    if cfg.stage.stage == 1 and cfg.routers.capacity_plan == "warm_start":
        set_layer_capacity(model, saved_router_config(Path(checkpoint) / ROUTERS_FILE).layer_capacity)


def calibrate_stage2(cfg, engine, batches) -> dict | None:
    """Stage 2 with stage.calibrate.enabled, fresh runs: calibrate the routers loaded from stage.init_from
    (routing/calibrate.py) before LoRA trains; returns {"before": rates, "after": rates}. Every rank calls it."""
    options = cfg.stage.calibrate
    if cfg.stage.stage != 2 or not options.enabled:
        return None
    model, mbs = engine.model, cfg.optim.micro_batch_size
    sequences = calibration_sequences(batches, options.sequences)
    kinds = KINDS if options.kinds == "both" else (options.kinds,)
    # Static slots, as the loop's evaluation: every rank runs every sublayer (ZeRO-3 gathers per submodule), and
    # the decisions do not depend on how the sequences are batched, so N ranks calibrate as one process does.
    with inference_slots(model, "static"):
        before = skip_rates(collect_margins(model, sequences, mbs))
        calibrate_routers(model, sequences, method=options.method, micro_batch_size=mbs, kinds=kinds,
                          sparsity=options.sparsity, writable=lambda: engine.writable(router_biases(model)))
        after = skip_rates(collect_margins(model, sequences, mbs))
    log(f"routers calibrated ({options.method}, kinds {options.kinds}) on {len(sequences)} sequences: skip rate "
        f"attention {before['attn']:.3f} -> {after['attn']:.3f}, MLP {before['mlp']:.3f} -> {after['mlp']:.3f}")
    return {"before": before, "after": after}
