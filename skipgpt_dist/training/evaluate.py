"""Held-out perplexity of the routed model and, for comparison, of the same model with routers off."""
from __future__ import annotations

import math

import torch

from ..routing import inference_slots, routing_disabled
from ..routing.api import routing_stats_tensor
from . import distributed as D


@torch.no_grad()
def _nll(model, sequences: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """[nll_sum, tokens, attn_executed, mlp_executed, routed_tokens] over this rank's share, summed over ranks.

    Every rank runs the same number of forwards (sharded models need all ranks in every forward); ranks with
    fewer real sequences run a duplicate whose contribution is zeroed.
    """
    rank, world = D.rank(), D.world_size()
    share = sequences[rank::world]
    per_rank = math.ceil(len(sequences) / world)
    device = next(p for p in model.parameters()).device
    # Summed on the device (no host sync per micro-batch); the caller transfers once, after the all-reduce.
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    for start in range(0, per_rank, micro_batch_size):
        rows = list(range(start, min(start + micro_batch_size, per_rank)))
        real = torch.tensor([r < len(share) for r in rows], device=device)
        pool = share if len(share) else sequences[:1]  # more ranks than sequences: this rank runs duplicates only
        ids = pool[[min(r, len(pool) - 1) for r in rows]].to(device)
        mask = torch.ones_like(ids)
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                                reduction="none").sum(dim=1)
        count = real.sum().double()
        seen = count * ids.shape[1]
        execute = routing_stats_tensor(model)[:2].to(device)
        totals += torch.stack([(nll * real).sum().double(), count * (ids.shape[1] - 1), execute[0] * seen,
                               execute[1] * seen, seen])
    return D.all_reduce_sum(totals)


def evaluate(model, sequences: torch.Tensor, micro_batch_size: int) -> dict:
    """{"ppl_routed", "ppl_dense", "attn_sparsity", "mlp_sparsity", "sparsity", "sequences"}."""
    was_training = model.training
    model.eval()
    try:
        # Static slots, as in training: every rank runs every sublayer (sharded parameters are gathered
        # collectively), and N ranks report what one process reports (dynamic slots would differ on overflow).
        with inference_slots(model, "static"):
            routed = _nll(model, sequences, micro_batch_size)
        with routing_disabled(model):
            dense = _nll(model, sequences, micro_batch_size)
    finally:
        model.train(was_training)
    routed, dense = routed.tolist(), dense.tolist()
    attn = 1.0 - routed[2] / routed[4]
    mlp = 1.0 - routed[3] / routed[4]
    return {"ppl_routed": math.exp(routed[0] / routed[1]), "ppl_dense": math.exp(dense[0] / dense[1]),
            "attn_sparsity": attn, "mlp_sparsity": mlp, "sparsity": (attn + mlp) / 2, "sequences": len(sequences)}


def score_text(model, tokenizer, data, seq_len: int, sequences: int, micro_batch_size: int,
               text_field: str = "text", data_format: str = "auto", at_most: bool = True) -> dict:
    """evaluate() on `sequences` packed held-out sequences of `data` (files, folders or builtin: names; at_most:
    fewer if the text is shorter), as tools/eval_ppl.py prints it. Under torchrun rank 0 tokenises first, so
    `datasets` caches the text once and the other ranks read the cache; every rank then scores its share."""
    from ..data import packed_eval_sequences

    with D.main_rank_first():
        held_out = packed_eval_sequences(data, tokenizer, seq_len, sequences, data_format, text_field, at_most)
    return evaluate(model, held_out, micro_batch_size)
