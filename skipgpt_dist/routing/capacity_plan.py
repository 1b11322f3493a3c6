"""Per-layer capacity plans: how many static slots each routed sublayer gets while routers train.

A uniform capacity must be as large as the busiest sublayer needs (an executed token that finds no slot is a
forced skip, which a small model cannot afford in the layers it needs), so it wastes slots everywhere else. The
block-influence warm start already says which sublayers are expected to run for nearly every token and which
are expected to be skipped by most: the first get every slot (capacity 1.0: they can never overflow), the
second a small share. Under gate_grad=probe a marked sublayer's free slots carry probes, so its router still
learns which of its skipped tokens should run.
"""
from __future__ import annotations

KINDS = ("attn", "mlp")


def warm_start_capacity(num_layers: int, attn_marked: list[int], mlp_marked: list[int],
                        marked_capacity: tuple[float, float]) -> dict[str, list[float]]:
    """{"attn": [...], "mlp": [...]}: the kind's marked_capacity (attention, MLP) for the sublayers the warm start
    marks, 1.0 for the rest."""
    marked = {"attn": set(attn_marked), "mlp": set(mlp_marked)}
    return {kind: [float(cap) if i in marked[kind] else 1.0 for i in range(num_layers)]
            for kind, cap in zip(KINDS, marked_capacity)}


def describe_capacity(plan: dict[str, list[float]]) -> str:
    """One log line: the mean slot fraction per kind (what a training step pays for)."""
    means = {kind: sum(values) / len(values) for kind, values in plan.items()}
    return f"capacity plan: mean slots attention {means['attn']:.3f}, MLP {means['mlp']:.3f} of each sequence"
