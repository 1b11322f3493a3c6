"""routers.init=block_influence: warm-start stage-1 routers from a ShortGPT ranking of the sublayers."""
from __future__ import annotations

from ..errors import SkipGPTError
from ..routing.api import set_layer_capacity
from ..routing.capacity_plan import describe_capacity, warm_start_capacity
from ..static_pruning import block_influence, init_routers_from_influence
from .reporting import log

CALIBRATION_SEQUENCES = 16


def warm_start_routers(cfg, model, batches) -> None:
    """Before the first step of stage 1: rank sublayers by block influence on a few training sequences (the data
    position is left where it was) and set the router biases (static_pruning.init_routers_from_influence).
    A resumed run loads its routers from the checkpoint afterwards, so this only shapes a fresh start."""
    routers = cfg.routers
    if cfg.stage.stage != 1 or routers.init != "block_influence":
        return
    if cfg.parallel.backend != "none":
        raise SkipGPTError(f"routers.init=block_influence runs the whole model before sharding and needs "
                           f"parallel.backend=none (got {cfg.parallel.backend}): warm-start in a one-process run "
                           "(a few steps), then continue distributed with resume, or use routers.init=margin")
    influence = block_influence(model, batches.peek_sequences(CALIBRATION_SEQUENCES), cfg.optim.micro_batch_size)
    if routers.target_sparsity_attn is not None:
        fractions = (routers.target_sparsity_attn, routers.target_sparsity_mlp)
    else:
        fractions = (routers.target_sparsity, None)
    attn, mlp = init_routers_from_influence(model, influence, fractions, routers.init_margin,
                                            routers.init_skip_margin)
    log(f"routers warm-started from block influence: attention layers {attn} and MLP layers {mlp} start at "
        f"margin {routers.init_skip_margin}, the rest at {routers.init_margin}")
    if routers.capacity_plan == "warm_start":  # the marked sublayers get few slots, the rest every slot
        plan = warm_start_capacity(len(influence.attn), attn, mlp, routers.marked_capacity)
        set_layer_capacity(model, plan)
        log(describe_capacity(plan))
