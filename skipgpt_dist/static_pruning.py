"""Static pruning baselines (ShortGPT): drop the whole layers, or the attention sublayers, that change the hidden
state least, at the same sublayer sparsity a SkipGPT model reaches.

Block influence (ShortGPT, Men et al. 2024): BI = 1 - E_t[cos(x_t, y_t)] for a block mapping x to y, averaged over
real tokens of calibration text. For a whole layer x is the layer input and y its output; for the attention
sublayer y = x + attn(x) (the state after the attention residual add).

A static decision is expressed with the model's own routers: weight 0 and a bias margin of +-STATIC_MARGIN, so every
token executes (or skips) that sublayer at evaluation. The pruned model is then evaluated by exactly the code that
evaluates SkipGPT routers, and sparsity is counted the same way (fraction of sublayer executions skipped).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .routing.api import ROUTER_NAMES, routed_layers, routing_disabled
from .routing.calibrate import sequence_records

STATIC_MARGIN = 30.0


@dataclass
class BlockInfluence:
    layer: list[float]  # whole decoder layer, per layer index
    attn: list[float]  # attention sublayer (input -> input + attention output)
    mlp: list[float]  # MLP sublayer (post-attention state -> layer output)


@torch.no_grad()
def block_influence(model, sequences: torch.Tensor, micro_batch_size: int = 4) -> BlockInfluence:
    """ShortGPT block influence of every layer and attention sublayer, on the dense model (routing disabled):
    the mean over every token of every sequence. On every rank of a sharded model with the same sequences, each
    rank runs its share and every rank gets the same scores (calibrate.sequence_records)."""
    layers = routed_layers(model)
    kinds = ("layer", "attn", "mlp")
    keys = [(kind, idx) for kind in kinds for idx in range(len(layers))]
    inputs: dict[int, torch.Tensor] = {}
    mids: dict[int, torch.Tensor] = {}

    def attach(store: dict) -> list:
        def layer_pre(idx):
            def hook(module, args, kwargs):
                inputs[idx] = args[0] if args else kwargs["hidden_states"]
            return hook

        def layer_post(idx):
            def hook(module, args, kwargs, output):
                out = output[0] if isinstance(output, tuple) else output
                store[("layer", idx)] = _cos_distance(inputs[idx], out)
                store[("mlp", idx)] = _cos_distance(mids[idx], out)
            return hook

        def mid_pre(idx):  # the MLP norm's input is the post-attention state x + attn(x)
            def hook(module, args):
                mids[idx] = args[0]
                store[("attn", idx)] = _cos_distance(inputs[idx], args[0])
            return hook

        handles = []
        for idx, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(layer_pre(idx), with_kwargs=True))
            handles.append(layer.register_forward_hook(layer_post(idx), with_kwargs=True))
            handles.append(getattr(layer, layer._skipgpt.adapter.mlp_norm).register_forward_pre_hook(mid_pre(idx)))
        return handles

    with routing_disabled(model):
        records = sequence_records(model, sequences, micro_batch_size, keys, attach)  # (N, 3L) per-sequence sums
    means = (records.sum(dim=0) / sequences.numel()).tolist()  # every token is real in calibration sequences
    per_kind = len(layers)
    return BlockInfluence(**{kind: means[i * per_kind:(i + 1) * per_kind] for i, kind in enumerate(kinds)})


def _cos_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sequence (batch,), the sum over its tokens of 1 - cos(x_t, y_t), in float64."""
    cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
    return (1.0 - cos).double().sum(dim=-1)


def least_influential(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` lowest scores, ascending by index."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    return sorted(order[:count])


def layer_drop_plan(influence: BlockInfluence, sparsity: float) -> tuple[list[int], list[int]]:
    """(attention layers to skip, MLP layers to skip) dropping whole layers: round(sparsity * L) layers."""
    count = round(sparsity * len(influence.layer))
    dropped = least_influential(influence.layer, count)
    return dropped, dropped


def attention_drop_plan(influence: BlockInfluence, sparsity: float) -> tuple[list[int], list[int]]:
    """Skip only attention sublayers: round(2 * sparsity * L) of them (capped at L), no MLP."""
    count = min(len(influence.attn), round(2 * sparsity * len(influence.attn)))
    return least_influential(influence.attn, count), []


@torch.no_grad()
def set_static_routing(model, attn_skip: list[int], mlp_skip: list[int]) -> None:
    """Make every router constant: skip (for the listed layers) or execute, for every token."""
    for idx, layer in enumerate(routed_layers(model)):
        for name, skip in zip(ROUTER_NAMES, (attn_skip, mlp_skip)):
            router = getattr(layer, name)
            for module in router.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.zero_()
                    module.bias.zero_()
            router.set_margin_bias(-STATIC_MARGIN if idx in skip else STATIC_MARGIN)


@torch.no_grad()
def init_routers_from_influence(model, influence: BlockInfluence, skip_fractions: tuple[float, float],
                                execute_margin: float, skip_margin: float) -> tuple[list[int], list[int]]:
    """Warm-start routers from ShortGPT: the least influential sublayers start with `skip_margin` (most tokens
    skip them when gates are sampled), the rest with `execute_margin`; router weights keep their small random
    init, so training refines the static choice per token. skip_fractions: (attention, MLP) fractions of
    sublayers to mark, or (f, None) for a fraction f of all 2L sublayers ranked together.
    Returns the marked (attention, MLP) layer indices."""
    layers = len(influence.attn)
    attn_frac, mlp_frac = skip_fractions
    if mlp_frac is None:
        ranked = sorted([(score, "attn", i) for i, score in enumerate(influence.attn)]
                        + [(score, "mlp", i) for i, score in enumerate(influence.mlp)])
        chosen = ranked[:round(attn_frac * 2 * layers)]
        attn_skip = sorted(i for _, kind, i in chosen if kind == "attn")
        mlp_skip = sorted(i for _, kind, i in chosen if kind == "mlp")
    else:
        attn_skip = least_influential(influence.attn, round(attn_frac * layers))
        mlp_skip = least_influential(influence.mlp, round(mlp_frac * layers))
    for idx, layer in enumerate(routed_layers(model)):
        for name, skip in zip(ROUTER_NAMES, (attn_skip, mlp_skip)):
            getattr(layer, name).set_margin_bias(skip_margin if idx in skip else execute_margin)
    return attn_skip, mlp_skip
