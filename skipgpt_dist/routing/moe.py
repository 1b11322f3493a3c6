"""Mixture-of-experts MLPs under routing (Mixtral): the skip router decides first, and only the tokens it executes
(the gathered slots, in capacity mode) reach the expert router and the experts; skipped tokens send nothing.

The auxiliary load-balancing loss. Hugging Face's causal LM computes it from the expert-router logits it records
per layer, weighting the (B*S) rows by the 2-D attention mask; under capacity routing each layer's expert router
sees its own (B*k) slot rows, which that mask does not fit. So, for families whose adapter names an expert router,
attach_routers takes the loss over: a pre-hook on the causal LM asks Hugging Face for no router logits, a forward
hook on each layer's expert router records them, and a forward hook on the causal LM computes the same
Switch-Transformer loss over the rows that reached the experts as executed tokens, puts it in `aux_loss` (and the
recorded logits in `router_logits`) and adds router_aux_loss_coef * aux_loss to `loss` when labels were given.
Row weights: an executed token 1; a padding slot 0 (it holds some token's state, runs the experts, and its output
is discarded); a probe slot (gate_grad=probe: a skipped token run for the gradient, added with gate value 0) 0; in
mask mode every token runs the experts and the executed ones weigh 1. So capacity == mask holds for the aux loss
too whenever nothing overflows, and with routing disabled it is Hugging Face's loss over the non-padding tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def install_moe_aux(model: nn.Module, layers, adapter, ctx) -> None:
    """Hooks that compute the aux loss over the tokens that reached the experts (see the module docstring)."""
    for idx, layer in enumerate(layers):
        router = getattr(getattr(layer, adapter.mlp), adapter.moe_router)
        router.register_forward_hook(_record_logits(ctx, idx))
    model.register_forward_pre_hook(_take_over_router_logits(ctx), with_kwargs=True)
    model.register_forward_hook(_add_aux_loss(ctx), with_kwargs=True)


def record_moe_rows(ctx, layer_idx: int, plan) -> None:
    """Which rows of this layer's MoE input are executed tokens (bool, flattened), when the aux loss is asked."""
    if ctx.moe_record is not None:
        rows = plan.executed if plan.idx is None else plan.real
        ctx.moe_record.setdefault(layer_idx, {})["rows"] = rows.reshape(-1)


def _record_logits(ctx, layer_idx: int):
    def hook(module, args, output):
        if ctx.moe_record is not None:  # (the router returns (logits, top-k weights, top-k experts))
            ctx.moe_record.setdefault(layer_idx, {})["logits"] = output[0]

    return hook


def _take_over_router_logits(ctx):
    def hook(module, args, kwargs):
        wanted = kwargs.get("output_router_logits")
        if wanted is None:
            wanted = getattr(module.config, "output_router_logits", False)
        ctx.moe_record = {} if wanted else None
        if wanted:
            kwargs["output_router_logits"] = False  # Hugging Face's own loss would weigh slot rows by the mask
        return args, kwargs

    return hook


def _add_aux_loss(ctx):
    def hook(module, args, kwargs, output):
        record, ctx.moe_record = ctx.moe_record, None
        if record is None:
            return output
        layers = [record[i] for i in sorted(record) if len(record[i]) == 2]  # (a layer whose MLP ran)
        config = module.config
        aux = load_balancing_loss([e["logits"] for e in layers], [e["rows"] for e in layers],
                                  config.num_local_experts, config.num_experts_per_tok)
        output.aux_loss = aux
        output.router_logits = tuple(e["logits"] for e in layers)
        if output.loss is not None:
            output.loss = output.loss + config.router_aux_loss_coef * aux.to(output.loss.device)
        return output

    return hook


def load_balancing_loss(logits: list[torch.Tensor], rows: list[torch.Tensor], num_experts: int,
                        top_k: int) -> Optional[torch.Tensor]:
    """Switch Transformer's load-balancing loss (as Hugging Face's Mixtral computes it) with per-row weights:
    num_experts * sum_e (share of weighted top-k assignments to e) * (weighted mean router probability of e),
    over every layer's rows together. logits[l] (N_l, E); rows[l] (N_l,) bool."""
    if not logits:
        return None
    device = logits[0].device
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for layer_logits, weight in zip(logits, rows):
        weight = weight.to(device=device, dtype=torch.float32)
        probs = torch.softmax(layer_logits.to(device), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        assigned = assigned.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs.float() * weight[:, None]).sum(dim=0)
        total = total + weight.sum()
    total = total.clamp_min(1.0)  # (no executed token anywhere: a zero loss rather than 0/0)
    return num_experts * torch.sum((assigned / total) * (prob_sum / total))
