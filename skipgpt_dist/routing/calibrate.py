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
"""
from __future__ import annotations

from typing import Optional

import torch

from .api import ROUTER_NAMES, routed_layers, routing_context

KINDS = ("attn", "mlp")


@torch.no_grad()
def collect_margins(model, sequences: torch.Tensor, micro_batch_size: int) -> dict[str, list[torch.Tensor]]:
    """Deterministic router margins of every token, per kind and layer: {"attn": [L tensors], "mlp": [...]}."""
    layers = routed_layers(model)
    margins = {kind: [[] for _ in layers] for kind in KINDS}
    handles = []
    for idx, layer in enumerate(layers):
        for kind, name in zip(KINDS, ROUTER_NAMES):
            def hook(module, args, output, kind=kind, idx=idx):
                margins[kind][idx].append((output[..., 0] - output[..., 1]).float().reshape(-1).cpu())
            handles.append(getattr(layer, name).register_forward_hook(hook))
    forward_with_hooks(model, sequences, micro_batch_size, handles)
    return {kind: [torch.cat(parts) for parts in margins[kind]] for kind in KINDS}


@torch.no_grad()
def forward_with_hooks(model, sequences: torch.Tensor, micro_batch_size: int, handles: list) -> None:
    """Eval-mode forwards over unpadded sequences, for the hooks behind `handles`, which are removed after."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(sequences), micro_batch_size):
            ids = sequences[start:start + micro_batch_size]
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def expected_skip_rates(margins: list[torch.Tensor], target: Optional[float]) -> list[float]:
    """Each layer's expected skip rate under the sampled gates, mean(sigmoid(-m)), rescaled to `target` if given."""
    rates = torch.tensor([float(torch.sigmoid(-m).mean()) for m in margins])
    if target is not None and float(rates.mean()) > 0:
        rates = (rates * target / rates.mean()).clamp(0.0, 1.0)
    return rates.tolist()


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
                      passes: int = 2, kinds: tuple[str, ...] = KINDS) -> dict[str, float]:
    """Shift router biases (see module doc); returns the deterministic skip rate per kind measured on the
    calibration text before the last shift. Several passes, because skipping in one layer changes the hidden
    states, and so the margins, of the layers above.

    With per-kind targets each kind is calibrated to its own; with one global target attention and MLP routers
    are calibrated together, so the split between kinds stays the one training learned. `kinds` = one kind only:
    that kind's routers alone move, to meet the overall target with the other kind as it stands (e.g. ("attn",)
    when a small model's MLP routers have learned that nearly no MLP can be skipped)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    rates, layer_rates = {}, {}
    for _ in range(passes):
        margins = collect_margins(model, sequences, micro_batch_size)
        rates = {kind: float(torch.cat(margins[kind]).lt(0).float().mean()) for kind in KINDS}
        shifts = {kind: [0.0] * len(margins[kind]) for kind in KINDS}
        for group, target in calibration_groups(routing_context(model).cfg, kinds, rates):
            lists = [m for kind in group for m in margins[kind]]
            if method == "global":
                found = global_shifts(lists, target)
            else:  # the rates come from the trained margins; later passes only re-threshold to them
                layer_rates.setdefault(group, expected_skip_rates(lists, target))
                found = [_shift_for_rate(m, rate) for m, rate in zip(lists, layer_rates[group])]
            for i, kind in enumerate(group):
                shifts[kind] = found[i * len(margins[kind]):(i + 1) * len(margins[kind])]
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
