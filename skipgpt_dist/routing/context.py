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
from .gates import noise_base


def host_reads_free(device) -> bool:
    """Whether reading tensor values on the host costs nothing: CPU eager only. There the code may take
    data-dependent shortcuts (compacted caches, "no padding" checks); on a GPU each read stalls the launch queue
    (and FSDP2's overlap of the next all-gather), and under torch.compile it breaks the graph. The same rule as
    attention._trim_keys."""
    return torch.device(device).type == "cpu" and not torch.compiler.is_compiling()


@dataclass(frozen=True)
class TokenLayout:
    valid: torch.Tensor  # (B, S) bool: real token (not padding)
    positions: torch.Tensor  # (B, S) int64 position of each token
    count: torch.Tensor  # () number of real tokens
    masked: bool  # the forward was given a padding mask
    host_reads: bool = True  # values may be read on the host (host_reads_free, or a path that reads them anyway)

    @cached_property
    def all_valid(self) -> bool:
        """No padding among the current tokens. Asked only where the answer saves work. With a mask that needs a
        host read, so without host_reads the answer is a safe False ("maybe padding": masks instead of shortcuts)."""
        return not self.masked or (self.host_reads and bool(self.valid.all()))

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
    num_layers: int = 0  # routed layers sharing this context (each LayerRouting counts itself in)
    stats: dict = field(default_factory=dict)  # layer index -> per-kind statistics of the last forward
    layouts: dict = field(default_factory=dict)  # token_layout results of the current forward
    # MoE families, while the aux loss is asked: layer index -> {"logits": expert-router logits, "rows": executed}
    moe_record: Optional[dict] = None

    def valid_tokens(self, batch: int, seq_len: int, device) -> torch.Tensor:
        """(B, S) bool: which of the current tokens are real (not padding)."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2:
            return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        return mask[:, -seq_len:].to(device=device, dtype=torch.bool)

    def token_layout(self, batch: int, seq_len: int, past: int, device, host_reads: bool = True) -> "TokenLayout":
        """Which of the current tokens are real, and their positions.

        Built once per forward and shared by every layer (they all see the same tokens): a few ops per layer less,
        which matters at token-by-token decode. The pre-hook clears it when the next forward starts.
        """
        key = (batch, seq_len, past, device, torch.is_inference_mode_enabled(), host_reads)
        layout = self.layouts.get(key)
        if layout is None:
            valid = self.valid_tokens(batch, seq_len, device)
            positions = (past + torch.arange(seq_len, device=device)).expand(batch, seq_len)
            masked = self.attention_mask is not None and self.attention_mask.dim() == 2
            layout = self.layouts[key] = TokenLayout(valid, positions, valid.sum(), masked, host_reads)
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

    def temperature_tensor(self, device) -> torch.Tensor:
        """The Gumbel temperature as a 0-d float32 tensor on device, made once per forward (a fill, no copy)."""
        key = ("temperature", torch.device(device), float(self.temperature))
        cached = self.layouts.get(key)
        if cached is None:
            cached = self.layouts[key] = torch.full((), float(self.temperature), device=device)
        return cached

    def noise_sample_ids(self, batch: int, device) -> torch.Tensor:
        """(B,) int64 global sample ids of the rows on `device` (once per forward: see noise_inputs)."""
        return self.noise_inputs(batch, device)[0]

    def noise_inputs(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample ids (B,), noise bases (num_layers, 2)), int64 on `device`: everything the Gumbel noise of this
        forward needs besides token positions. Made once per forward with ONE host-to-device copy (ids and every
        (layer, kind) noise_base packed together) and shared by every layer, activation-checkpoint recompute
        included: no per-layer copy stalls the stream. The bases are data, not constants, so a compiled block does
        not recompile as the step advances."""
        key = ("noise", batch, torch.device(device), self.noise_seed, self.noise_counter(), self.num_layers)
        cached = self.layouts.get(key)
        if cached is None:
            ids = self.sample_ids
            ids = ids.reshape(-1).to(torch.int64) if ids is not None and ids.numel() == batch else None
            bases = [noise_base(self.noise_seed, self.noise_counter(), layer, kind)
                     for layer in range(max(self.num_layers, 1)) for kind in (0, 1)]
            host = torch.tensor(bases, dtype=torch.int64)
            if ids is not None and ids.device.type == "cpu":  # (the data loader's): one copy for ids and bases
                packed = _copy_to(torch.cat([ids, host]), device)
                ids, host = packed[:batch], packed[batch:]
            else:
                ids = ids.to(device) if ids is not None else torch.arange(batch, device=device)
                host = _copy_to(host, device)
            cached = self.layouts[key] = (ids, host.view(-1, 2))
        return cached


def _copy_to(host: torch.Tensor, device) -> torch.Tensor:
    """host on device without waiting for the stream: a copy from pageable memory first synchronises the stream
    (CUDA's rule), one from pinned memory is queued like a kernel (the pinned block is kept until it completes)."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


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
