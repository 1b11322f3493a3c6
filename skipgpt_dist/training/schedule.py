"""Learning-rate and Gumbel-temperature schedules, both functions of the optimiser step."""
from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier on the peak learning rate for optimiser step `step` (0-based): linear warmup, then
    constant or cosine decay to min_lr_ratio at max_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def temperature(step: int, max_steps: int, start: float, end: float) -> float:
    """Linear anneal from `start` at step 0 to `end` at the last step of the stage."""
    if max_steps <= 1:
        return end
    progress = min(1.0, step / (max_steps - 1))
    return start + (end - start) * progress
