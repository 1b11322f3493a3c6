"""Per-model routing context: what every routed layer of one model needs to know about the current forward.

The 2-D padding mask never reaches HF decoder layers (they get a 4-D additive mask or None), so a forward
pre-hook on the base model records it here. The training loop sets the noise counters (step, global sample ids)
so Gumbel noise is a function of the token, not of the rank or micro-batch that processes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch

from .adapters import rope_tables
from .config import RouterConfig


@dataclass(frozen=True)
class TokenLayout:
    valid: torch.Tensor  # (B, S) bool: real token (not padding)
    positions: torch.Tensor  # (B, S) int64 position of each token
    count: torch.Tensor  # () number of real tokens
    masked: bool  # the forward was given a padding mask

    @cached_property
    def all_valid(self) -> bool:
        """No padding among the current tokens. Asked only where the answer saves work (a host sync with a mask;
        inference paths that read decisions on the host anyway)."""
        return not self.masked or bool(self.valid.all())

    @cached_property
    def no_tokens(self) -> torch.Tensor:
        """(B, S) all false: the decisions when no token executes (built once per forward, when needed)."""
        return torch.zeros_like(self.valid)

    @cached_property
    def zero(self) -> torch.Tensor:
        return torch.zeros_like(self.count)


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
    layouts: dict = field(default_factory=dict)  # token_layout results of the current forward

    def valid_tokens(self, batch: int, seq_len: int, device) -> torch.Tensor:
        """(B, S) bool: which of the current tokens are real (not padding)."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2:
            return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        return mask[:, -seq_len:].to(device=device, dtype=torch.bool)

    def token_layout(self, batch: int, seq_len: int, past: int, device) -> "TokenLayout":
        """Which of the current tokens are real, and their positions.

        Built once per forward and shared by every layer (they all see the same tokens): a few ops per layer less,
        which matters at token-by-token decode. The pre-hook clears it when the next forward starts.
        """
        key = (batch, seq_len, past, device, torch.is_inference_mode_enabled())
        layout = self.layouts.get(key)
        if layout is None:
            valid = self.valid_tokens(batch, seq_len, device)
            positions = (past + torch.arange(seq_len, device=device)).expand(batch, seq_len)
            masked = self.attention_mask is not None and self.attention_mask.dim() == 2
            layout = self.layouts[key] = TokenLayout(valid, positions, valid.sum(), masked)
        return layout

    def rope_tables(self, position_embeddings, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """adapters.rope_tables of this forward's rotary embeddings, built once for all layers (the model passes
        every layer the same tensors)."""
        key = ("rope", id(position_embeddings[0]), batch)
        tables = self.layouts.get(key)
        if tables is None or tables[0] is not position_embeddings[0]:
            tables = (position_embeddings[0], rope_tables(*position_embeddings, batch))
            self.layouts[key] = tables
        return tables[1]

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
        ctx.layouts = {}
        return None

    return hook
