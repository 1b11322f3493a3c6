"""Per-model routing context: what every routed layer of one model needs to know about the current forward.

The 2-D padding mask never reaches HF decoder layers (they get a 4-D additive mask or None), so a forward
pre-hook on the base model records it here. The training loop sets the noise counters (step, global sample ids)
so Gumbel noise is a function of the token, not of the rank or micro-batch that processes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import RouterConfig


@dataclass
class RoutingContext:
    cfg: RouterConfig
    temperature: float = 5.0
    enabled: bool = True  # False: every sublayer executes (the dense model, for comparison)
    noisy: bool = True  # Gumbel noise in training mode; False keeps gates hard and deterministic (stage 2)
    noise_seed: int = 0
    noise_step: Optional[int] = None  # None: count forward calls (fresh noise per forward)
    sample_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None  # 2-D (B, past + S), 1 = real token
    forward_calls: int = 0
    stats: dict = field(default_factory=dict)  # layer index -> per-kind statistics of the last forward

    def valid_tokens(self, batch: int, seq_len: int, device) -> torch.Tensor:
        """(B, S) bool: which of the current tokens are real (not padding)."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2:
            return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        return mask[:, -seq_len:].to(device=device, dtype=torch.bool)

    def noise_counter(self) -> int:
        return self.noise_step if self.noise_step is not None else self.forward_calls

    def noise_sample_ids(self, batch: int, device) -> torch.Tensor:
        if self.sample_ids is not None and self.sample_ids.numel() == batch:
            return self.sample_ids.to(device)
        return torch.arange(batch, device=device)


def capture_attention_mask(ctx: RoutingContext):
    """A forward pre-hook (with kwargs) for the base model that records the 2-D padding mask."""

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ctx.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        ctx.forward_calls += 1
        ctx.stats = {}
        return None

    return hook
