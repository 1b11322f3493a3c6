"""Losses: next-token cross entropy, distillation from the dense model, and the SkipGPT sparsity regulariser, exact
across ranks.

The regulariser alpha * |T - mean(g)| is not linear in the tokens, so averaging per-rank losses would not give the
gradient of one process on the global micro-batch. The mean is taken over the GLOBAL micro-batch (all ranks) with
an all-reduce of the detached sums, and each rank back-propagates its linear share; the engines' gradient
averaging over ranks then yields exactly the single-process gradient (design.md invariant 3).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..routing import routing_context, routing_disabled
from . import distributed as D


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over real target tokens."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || model) of the next-token distributions, over the positions lm_loss scores."""
    real = attention_mask[:, 1:] != 0
    student = F.log_softmax(logits[:, :-1][real].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][real].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


@contextlib.contextmanager
def dense_teacher(model):
    """The model as the distillation teacher: every sublayer executes and LoRA adapters are off, i.e. the frozen
    base. Every rank runs every sublayer, so sharded back ends gather the same parameters on all ranks."""
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), routing_disabled(model), adapters_off:
        yield


def global_sparsity_loss(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(surrogate to back-propagate, reported value) of alpha * |T - mean(g)| over the global micro-batch."""
    ctx = routing_context(model)
    cfg = ctx.cfg
    kinds = ("attn", "mlp")
    local_sums = torch.stack([sum(s[k]["gate_sum"] for s in ctx.stats.values()) for k in kinds])
    local_counts = torch.stack([sum(s[k]["valid"] for s in ctx.stats.values()).float() for k in kinds])
    totals = D.all_reduce_sum(torch.cat([local_sums.detach().float(), local_counts.to(local_sums.device)]))
    sums, counts = totals[:2], totals[2:].clamp_min(1.0)
    targets = torch.tensor(cfg.targets(), device=sums.device)
    if cfg.target_sparsity_attn is not None:
        means, weights = sums / counts, torch.full((2,), 0.5, device=sums.device)
        value = (weights * (targets - means).abs()).sum()
        slope = weights * torch.sign(means - targets) / counts
    else:
        mean = sums.sum() / counts.sum()
        value = (targets[0] - mean).abs()
        slope = torch.sign(mean - targets[0]).expand(2) / counts.sum()
    # d value / d local_sums = slope; the engine averages gradients over ranks, hence * world_size.
    surrogate = (slope.detach() * local_sums).sum() * D.world_size()
    surrogate = surrogate - surrogate.detach() + value.detach()
    return cfg.alpha * surrogate, cfg.alpha * value.detach()
