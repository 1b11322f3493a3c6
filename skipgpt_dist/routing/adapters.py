"""Per-family adapters: where a Hugging Face decoder keeps the parts a routed layer needs.

A routed layer never forks HF modelling code; it calls the family's own submodules (norms, projections, MLP)
through the names an adapter gives. Adding a family that follows the Llama block layout is one table entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import SkipGPTError


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) of shape (B, 1, S, D) for apply_rope, from the model's rotary embeddings (1 or B, S, D).

    Hugging Face's rotate_half(x) = cat(-x2, x1) is roll(x, D/2) with its first half negated; the sign goes into
    sin here, and the head axis is inserted, once per forward: each rotation is then four ops instead of nine.
    """
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    if cos.shape[0] != batch:
        cos, signed = cos.expand(batch, -1, -1), signed.expand(batch, -1, -1)
    return cos.unsqueeze(1), signed.unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding x * cos + rotate_half(x) * sin on x (B, H, S, D), with tables from rope_tables.

    cos/sin are gathered at each token's ORIGINAL position, so compacted (gathered) tokens keep their RoPE phase.
    """
    # (mul + add rather than a fused addcmul: the same rounding as Hugging Face's own rotation)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass(frozen=True)
class FamilyAdapter:
    """Names the submodules of one decoder-layer family (all follow the pre-norm Llama block)."""

    family: str
    layers_path: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    # Returns the sliding window (in tokens) of one layer, or None for full attention.
    sliding_window: Callable[[nn.Module, object], Optional[int]] = lambda layer, config: None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for name in self.layers_path.split("."):
            module = getattr(module, name, None)
            if module is None:
                raise SkipGPTError(f"model has no `{self.layers_path}`: expected a Hugging Face "
                                   f"{self.family} causal LM (AutoModelForCausalLM)")
        return module

    def shape(self, config) -> "AttentionShape":
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return AttentionShape(heads=heads, kv_heads=kv_heads, head_dim=head_dim)


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int


def _mistral_window(layer, config) -> Optional[int]:
    return getattr(config, "sliding_window", None)


def _qwen2_window(layer, config) -> Optional[int]:
    # Qwen2 decides per layer (layer_types); the attention module records its own window.
    return getattr(layer.self_attn, "sliding_window", None)


ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama"),
    "mistral": FamilyAdapter("mistral", sliding_window=_mistral_window),
    "qwen2": FamilyAdapter("qwen2", sliding_window=_qwen2_window),
}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise SkipGPTError(f"model family {model_type!r} is not supported by skipgpt-dist: supported families are "
                           f"{', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]
