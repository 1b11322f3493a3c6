"""Gates: router logits -> execute/skip decisions, straight-through gradients and capacity slots.

Noise is a counter-based hash of (seed, step, global sample id, layer, kind, position, channel) rather than a
draw from a global RNG. The same token therefore gets the same Gumbel noise whichever rank processes it, in
whatever micro-batch, and after a resume: distributed == one process and resume == never stopped hold with noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    # Logical right shift on int64 (torch's >> is arithmetic for signed types).
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def _splitmix_int(x: int) -> int:
    """_splitmix on a Python int, bit for bit: int64 wrap-around is arithmetic mod 2**64 and the logical shifts
    read the unsigned value (so the host computes it without making a tensor)."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    return _signed(x ^ (x >> 31))


def noise_base(seed: int, step: int, layer: int, kind: int) -> int:
    """The (seed, step, layer, kind) part of the noise hash, as a signed int64 value computed on the host."""
    base = _signed(seed * 0x100000001B3 + step)
    for value in (layer, kind):
        base = _splitmix_int(base ^ _signed((value + 1) * _GOLDEN))
    return base


def hashed_uniform_from_base(base, sample_ids: torch.Tensor, positions: torch.Tensor,
                             channels: int = 2) -> torch.Tensor:
    """hashed_uniform given its noise_base: a Python int, or a 0-d int64 tensor on positions' device (what the
    routed block passes: the per-forward table of RoutingContext.noise_inputs, so a compiled block takes the step
    as data rather than as a constant it would recompile for). Creates no tensor on the host.

    channels: values per token. Each channel is hashed on its own, so the first two (the Gumbel noise) are the
    same whatever the count; a third draws the probe order (gate_grad=probe) independently of the gates."""
    ids = sample_ids.to(positions.device, torch.int64)  # a no-op for ids already there (RoutingContext)
    x = _splitmix((ids * _GOLDEN)[:, None] ^ base)
    x = _splitmix(x ^ (positions.to(torch.int64) * _M1))
    channel = torch.arange(1, channels + 1, device=positions.device, dtype=torch.int64) * _M2
    x = _splitmix(x[..., None] ^ channel)
    bits = _shr(x, 11).to(torch.float64)
    return ((bits + 0.5) / float(1 << 53)).to(torch.float32)


def hashed_uniform(seed: int, step: int, sample_ids: torch.Tensor, layer: int, kind: int,
                   positions: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) noise of shape (B, S, 2), a pure function of its arguments.

    sample_ids: (B,) global ids of the rows; positions: (B, S) token positions within each row.
    """
    return hashed_uniform_from_base(noise_base(seed, step, layer, kind), sample_ids, positions)


@dataclass
class Gates:
    """Decisions of one router for one forward pass.

    hard: (B, S) bool, the router's execute decisions (never true on padding).
    score: (B, S) float, the (noisy in training) margin execute - skip, used to rank tokens for capacity slots;
        None for a decision taken on the host (dynamic inference slots, one token: nothing to rank).
    soft: (B, S) float execute probability carrying the straight-through gradient, or None without grad.
    """

    hard: torch.Tensor
    score: Optional[torch.Tensor]
    soft: Optional[torch.Tensor]

    def straight_through(self, executed: torch.Tensor, dense: bool) -> torch.Tensor:
        """Multiplier for the sublayer output: equal to `executed` in value, with the ST gradient.

        dense=False: the gradient reaches only executed tokens (a skipped sublayer has no output to differentiate).
        """
        value = executed.to(self.score.dtype)
        if self.soft is None:
            return value
        surrogate = self.soft - self.soft.detach()
        return value + (surrogate if dense else value * surrogate)

    def regulariser_gate(self) -> torch.Tensor:
        """The gate the sparsity loss sees: hard value, ST gradient on every token."""
        value = self.hard.to(self.score.dtype)
        if self.soft is None:
            return value
        return value + self.soft - self.soft.detach()


def draw_gates(logits: torch.Tensor, valid: torch.Tensor, temperature: float,
               noise: Optional[torch.Tensor], all_valid: bool = False) -> Gates:
    """Hard straight-through Gumbel-softmax gates (noise given) or deterministic argmax gates (noise None).

    all_valid: no token is padding (valid is all true), so the decisions need no masking.
    """
    if logits.dtype != torch.float32:
        logits = logits.float()
    if noise is not None:
        gumbel = -torch.log(-torch.log(noise))
        z = (logits + gumbel) / temperature
        soft = torch.softmax(z, dim=-1)[..., 0]
    else:
        z = logits
        soft = torch.softmax(logits, dim=-1)[..., 0] if logits.requires_grad else None
    execute, skip = z.unbind(dim=-1)
    score = execute - skip
    hard = score > 0 if all_valid else (score > 0) & valid
    return Gates(hard=hard, score=score, soft=soft)


def capacity_slots(seq_len: int, capacity: float) -> int:
    return max(1, math.ceil(capacity * seq_len - 1e-9))


def select_slots(candidates: torch.Tensor, score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill k static slots per row with candidate tokens, highest score first.

    Returns idx (B, k) token indices, distinct and in original token order (so compacted sequences stay causal),
    and real (B, k) bool: the slot holds a candidate. Other slots are padding (when a row has fewer than k
    candidates), interleaved in token order, and must be discarded by the caller.
    """
    idx = _top_k_in_token_order(torch.where(candidates, score, float("-inf")), k)
    return idx, candidates.gather(1, idx)


def _top_k_in_token_order(keyed: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of each row's k highest keys, in token order. The top-k set (unordered), then its indices
    sorted: one small sort of k values instead of a sort of (real first, then token) keys and two gathers."""
    return keyed.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


# Probe keys rank below every executed token (their scores are > 0) and above padding (-inf).
_PROBE_OFFSET = -3.0


def select_slots_with_probes(hard: torch.Tensor, valid: torch.Tensor, score: torch.Tensor, probe_key: torch.Tensor,
                             k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """select_slots for gate_grad=probe: executed tokens first (highest score first, as select_slots), then the
    slots left free go to skipped real tokens in the random order of probe_key (B, S) in [0, 1).

    Returns idx, real (slot holds an executed token), probe (slot holds a skipped token, sampled) and weight
    (B, 1): skipped tokens per sampled one in the row, so the probes' gradient sums to an unbiased estimate of
    the gradient every skipped token would give (mask mode's dense estimator)."""
    idx = _top_k_in_token_order(torch.where(hard, score, torch.where(valid, probe_key + _PROBE_OFFSET,
                                                                     float("-inf"))), k)
    real = hard.gather(1, idx)
    probe = valid.gather(1, idx) & ~real
    skipped = (valid & ~hard).sum(dim=1, keepdim=True)
    weight = skipped / probe.sum(dim=1, keepdim=True).clamp(min=1)
    return idx, real, probe, weight.to(score.dtype)
