"""Calibrate trained routers so that deterministic (evaluation) decisions skip as much as training did.

Training samples hard Gumbel gates: a token with router margin m (execute logit - skip logit) skips with
probability sigmoid(-m). Evaluation is deterministic: it skips iff m < 0. After a short stage 1 the margins of
most tokens are still positive even where training skipped often, so the evaluated model skips far less than the
target (and loses quality on the tokens it does skip, since it was never trained on that operating point).

Calibration shifts each router's bias (execute - skip) by one constant so that, on calibration text, the tokens
with the lowest margins skip, as many as training skipped in expectation:
- `per_layer`: each layer and kind keeps its own expected skip rate mean(sigmoid(-m)), rescaled so that the rates
  meet the configured target(s);
- `global`: one threshold per kind across all layers, on the margins (the tokens training was most likely to skip,
  wherever they are).
The result is still a router (same architecture, only the last bias changes), so every execution mode, export and
the decode path see calibrated decisions without special cases.

On several ranks (stage.calibrate in a sharded training job) every rank passes the same sequences, runs its share
of them and gathers the margins of all (sequence_records, through training.distributed's all_reduce_sum), so
every rank computes the same shifts; in one process (tools/calibrate_routers.py) that is every sequence.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Optional

import torch

from ..training import distributed as D
from .api import ROUTER_NAMES, routed_layers, routing_context

KINDS = ("attn", "mlp")


@torch.no_grad()
def collect_margins(model, sequences: torch.Tensor, micro_batch_size: int) -> dict[str, list[torch.Tensor]]:
    """Deterministic router margins of every token of every sequence, per kind and layer: {"attn": [L tensors],
    "mlp": [...]}, each of the N * S margins in sequence order, the same on every rank (sequence_records)."""
    layers = routed_layers(model)
    keys = [(kind, idx) for kind in KINDS for idx in range(len(layers))]

    def attach(store: dict) -> list:
        handles = []
        for idx, layer in enumerate(layers):
            for kind, name in zip(KINDS, ROUTER_NAMES):
                def hook(module, args, output, key=(kind, idx)):
                    store[key] = (output[..., 0] - output[..., 1]).float()
                handles.append(getattr(layer, name).register_forward_hook(hook))
        return handles

    records = sequence_records(model, sequences, micro_batch_size, keys, attach)  # (N, 2L, S)
    return {kind: [records[:, keys.index((kind, idx))].reshape(-1) for idx in range(len(layers))] for kind in KINDS}


@torch.no_grad()
def sequence_records(model, sequences: torch.Tensor, micro_batch_size: int, keys: list,
                     attach: Callable[[dict], list]) -> torch.Tensor:
    """Per-sequence statistics of every sequence, in order, on every rank: (N, len(keys), ...).

    attach(store) registers forward hooks that put one (batch, ...) tensor under each of `keys` per forward. Each
    rank runs only its share of the sequences (rank_rows) and the shares are gathered (gather_rows), so N ranks
    compute what one process computes, with 1/N of the forwards each; in one process this is simply every row."""
    rows, own = rank_rows(len(sequences))
    store: dict = {}
    parts: list[torch.Tensor] = []

    def collect() -> None:  # (on the first key's device: under a device map each layer's hook fires on its GPU)
        first = store[keys[0]].device
        parts.append(torch.stack([store.pop(key).to(first) for key in keys], dim=1))

    forward_with_hooks(model, sequences[rows], micro_batch_size, attach(store), after_batch=collect)
    return gather_rows(torch.cat(parts), rows, own, len(sequences))


def rank_rows(total: int) -> tuple[list[int], int]:
    """(global indices of the sequences this rank runs, how many of them are its own: the rest repeat one).
    Rank r takes sequences r, r + W, ...; every rank runs ceil(total / W) of them, because a sharded model
    (FSDP2, ZeRO-3) needs every rank in every forward."""
    rank, world = D.rank(), D.world_size()
    own = list(range(rank, total, world))
    pad = math.ceil(total / world) - len(own)
    return own + [own[-1] if own else 0] * pad, len(own)


def gather_rows(local: torch.Tensor, rows: list[int], own: int, total: int) -> torch.Tensor:
    """(total, ...) on every rank: each rank's own rows of `local` at their global indices. A sum over ranks of
    zero-filled buffers (all_reduce_sum, on the collective's device), so exact: each entry has one contributor."""
    full = local.new_zeros((total, *local.shape[1:]))
    full[rows[:own]] = local[:own]
    return D.all_reduce_sum(full)


@torch.no_grad()
def forward_with_hooks(model, sequences: torch.Tensor, micro_batch_size: int, handles: list,
                       after_batch: Optional[Callable[[], None]] = None) -> None:
    """Eval-mode forwards over unpadded sequences (moved to the model's device), for the hooks behind `handles`,
    which are removed after; after_batch() runs after each forward."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(sequences), micro_batch_size):
            ids = sequences[start:start + micro_batch_size].to(device)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            if after_batch is not None:
                after_batch()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def skip_rates(margins: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Deterministic skip rate per kind (margin < 0) over every token of every layer."""
    return {kind: float(torch.cat(margins[kind]).lt(0).float().mean()) for kind in KINDS}


def expected_skip_rates(margins: list[torch.Tensor], target: Optional[float]) -> list[float]:
    """Each layer's expected skip rate under the sampled gates, mean(sigmoid(-m)), rescaled to `target` if given."""
    rates = torch.tensor([float(torch.sigmoid(-m).mean()) for m in margins], dtype=torch.float64)
    if target is not None and float(rates.mean()) > 0:
        rates = rescale_to_mean(rates, target)
    return rates.tolist()


def rescale_to_mean(rates: torch.Tensor, target: float) -> torch.Tensor:
    """min(1, c * rates) with c chosen so that the mean is `target`: one scale for every layer, as the trained
    rates' proportions ask, except that a layer cannot skip more than all of its tokens. (Clamping after one
    rescale, rates * target / mean, falls short of a high target by the clamped layers' excess: 33.6% instead of
    40% on SmolLM2-135M.) Layers at 0 stay at 0; a target the non-zero layers cannot reach gives them all 1."""
    positive = rates > 0
    if target >= float(positive.double().mean()):
        return positive.to(rates.dtype)
    low, high = 0.0, 1.0 / float(rates[positive].min())  # at `high` every non-zero layer is clamped to 1
    for _ in range(100):  # bisection on c: mean(min(1, c * rates)) increases with c
        mid = (low + high) / 2
        if float((rates * mid).clamp(max=1.0).mean()) < target:
            low = mid
        else:
            high = mid
    return (rates * high).clamp(0.0, 1.0)


def global_shifts(margins: list[torch.Tensor], target: float) -> list[float]:
    """One threshold over the margins of every layer: the `target` fraction with the lowest margins skips."""
    shift = _shift_for_rate(torch.cat(margins), target)
    return [shift] * len(margins)


def _shift_for_rate(margins: torch.Tensor, rate: float) -> float:
    """The shift s such that a fraction `rate` of margins + s is negative (ties aside)."""
    if rate <= 0.0:
        return float(-margins.min()) + 1e-3
    if rate >= 1.0:
        return float(-margins.max()) - 1e-3
    sorted_margins = margins.sort().values
    cut = min(len(sorted_margins) - 1, max(1, round(rate * len(sorted_margins))))
    # threshold halfway between the last skipped and the first executed margin
    return float(-(sorted_margins[cut - 1] + sorted_margins[cut]) / 2)


@torch.no_grad()
def apply_shifts(model, shifts: dict[str, list[float]]) -> None:
    """Add shift to each router's margin: bias[execute] += s/2, bias[skip] -= s/2."""
    for idx, layer in enumerate(routed_layers(model)):
        for kind, name in zip(KINDS, ROUTER_NAMES):
            getattr(layer, name).set_margin_bias(shifts[kind][idx], add=True)


def calibrate_routers(model, sequences: torch.Tensor, method: str = "per_layer", micro_batch_size: int = 4,
                      passes: int = 2, kinds: tuple[str, ...] = KINDS, sparsity: Optional[float] = None,
                      writable: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                      ) -> dict[str, float]:
    """Shift router biases (see module doc); returns the deterministic skip rate per kind measured on the
    calibration text before the last shift. Several passes, because skipping in one layer changes the hidden
    states, and so the margins, of the layers above.

    With per-kind targets each kind is calibrated to its own; with one global target attention and MLP routers
    are calibrated together, so the split between kinds stays the one training learned. `kinds` = one kind only:
    that kind's routers alone move, to meet the overall target with the other kind as it stands (e.g. ("attn",)
    when a small model's MLP routers have learned that nearly no MLP can be skipped). `sparsity`: one overall
    target instead of the routers' own. Every rank of a sharded model calls this with the same sequences and
    computes the same shifts from the gathered margins; `writable()` is the context in which the biases are
    written (Engine.writable: ZeRO-3 gathers them and updates the optimiser's fp32 masters)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    cfg = routing_context(model).cfg
    if sparsity is not None:
        cfg = dataclasses.replace(cfg, target_sparsity=sparsity, target_sparsity_attn=None, target_sparsity_mlp=None)
    rates, layer_rates = {}, {}
    for _ in range(passes):
        margins = collect_margins(model, sequences, micro_batch_size)
        rates = skip_rates(margins)
        shifts = {kind: [0.0] * len(margins[kind]) for kind in KINDS}
        for group, target in calibration_groups(cfg, kinds, rates):
            lists = [m for kind in group for m in margins[kind]]
            if method == "global":
                found = global_shifts(lists, target)
            else:  # the rates come from the trained margins; later passes only re-threshold to them
                layer_rates.setdefault(group, expected_skip_rates(lists, target))
                found = [_shift_for_rate(m, rate) for m, rate in zip(lists, layer_rates[group])]
            for i, kind in enumerate(group):
                shifts[kind] = found[i * len(margins[kind]):(i + 1) * len(margins[kind])]
        with writable():
            apply_shifts(model, shifts)
    return rates


def calibration_groups(cfg, kinds: tuple[str, ...], rates: dict[str, float]) -> list[tuple[tuple[str, ...], float]]:
    """[(kinds calibrated together, their target skip rate)] for calibrate_routers."""
    skip_attn, skip_mlp = (1.0 - t for t in cfg.targets())
    if len(kinds) == 1:  # one kind meets the overall mean, the other stays where it is
        other = "mlp" if kinds[0] == "attn" else "attn"
        return [(kinds, min(1.0, max(0.0, skip_attn + skip_mlp - rates[other])))]
    if cfg.target_sparsity_attn is not None:
        return [(("attn",), skip_attn), (("mlp",), skip_mlp)]
    return [(KINDS, skip_attn)]
