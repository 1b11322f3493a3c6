"""Per-family adapters: the family's math a routed layer needs, done with the family's own submodules.

A routed layer never forks HF modelling code: it calls the family's norms, projections and MLP through an
adapter, which gives q, k, v (B, H, S, D) before RoPE (per-head norms, biases and fused projections included),
RoPE (partial rotary included), the attention output projection, the MLP (a tuple-returning MoE unwrapped), the
pre/post norms around each sublayer (Gemma 2's sandwich norms: h + g * post_norm(f(pre_norm(h)))), and per layer
the sliding window, attention scale and attention logit soft-capping. Adding a family is one table entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import SkipGPTError


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) of shape (B, 1, S, R) for apply_rope, from the model's rotary embeddings (1 or B, S, R).

    Hugging Face's rotate_half(x) = cat(-x2, x1) is roll(x, R/2) with its first half negated; the sign goes into
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
    Tables narrower than the head (partial rotary, e.g. Phi-3's partial_rotary_factor) turn the first R dims and
    pass the rest through, as Hugging Face does.
    """
    rotary = cos.shape[-1]
    if rotary != x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, signed_sin), x[..., rotary:]), dim=-1)
    # (mul + add rather than a fused addcmul: the same rounding as Hugging Face's own rotation)
    return x * cos + x.roll(rotary // 2, dims=-1) * signed_sin


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int


def _heads(out: torch.Tensor, heads: int, head_dim: int, norm: Optional[nn.Module] = None) -> torch.Tensor:
    """(B, S, heads * D) -> (B, heads, S, D), with a per-head norm on (B, S, heads, D) first (Qwen3's q/k norms, in
    Hugging Face's order)."""
    out = out.view(*out.shape[:2], heads, head_dim)
    return (out if norm is None else norm(out)).transpose(1, 2)


def _none(layer, config) -> None:
    return None


def _config_window(layer, config) -> Optional[int]:
    return getattr(config, "sliding_window", None)


def _module_window(layer, config) -> Optional[int]:
    # per layer (layer_types): the attention module records its own window (Qwen2, Qwen3, Gemma 2)
    return getattr(layer.self_attn, "sliding_window", None)


def _module_softcap(layer, config) -> Optional[float]:
    return getattr(layer.self_attn, "attn_logit_softcapping", None)


@dataclass(frozen=True)
class FamilyAdapter:
    """One decoder-layer family: submodule names and the few ways families differ from the Llama block."""

    family: str
    layers_path: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"  # the norm in front of the MLP
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    qkv_proj: Optional[str] = None  # one fused projection split into q, k, v (Phi-3); q/k/v_proj then unused
    qk_norm: bool = False  # per-head q_norm / k_norm before RoPE (Qwen3)
    # modules applied to a sublayer's output before the residual add: Gemma 2's sandwich norms, Phi-3's dropout
    attn_post: Optional[str] = None
    mlp_post: Optional[str] = None
    # the MLP is a sparse MoE block: its expert-router submodule, recorded for the aux loss (moe.py)
    moe_router: Optional[str] = None
    # the sliding window (in tokens) of one layer, or None for full attention; and its attention logit soft-cap
    sliding_window: Callable[[nn.Module, object], Optional[int]] = _none
    softcap: Callable[[nn.Module, object], Optional[float]] = _none
    # the project's default LoRA target names (Llama's) -> this family's (None: nothing peft can wrap)
    lora_names: dict = field(default_factory=dict)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for name in self.layers_path.split("."):
            module = getattr(module, name, None)
            if module is None:
                raise SkipGPTError(f"model has no `{self.layers_path}`: expected a Hugging Face "
                                   f"{self.family} causal LM (AutoModelForCausalLM)")
        return module

    def shape(self, config) -> AttentionShape:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return AttentionShape(heads=heads, kv_heads=kv_heads, head_dim=head_dim)

    # ------------------------------------------------------------ attention
    def qkv(self, attn: nn.Module, x: torch.Tensor, shape: AttentionShape):
        """q (B, H, S, D), k, v (B, Hkv, S, D) of tokens x (B, S, d), before RoPE."""
        if self.qkv_proj is None:
            return (self.q(attn, x, shape), *self.kv(attn, x, shape))
        out = getattr(attn, self.qkv_proj)(x)
        q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        q, k, v = out.split((q_size, kv_size, kv_size), dim=-1)
        return (_heads(q, shape.heads, shape.head_dim), _heads(k, shape.kv_heads, shape.head_dim),
                _heads(v, shape.kv_heads, shape.head_dim))

    def q_at_slots(self, attn: nn.Module, x: torch.Tensor, x_q: torch.Tensor, idx: torch.Tensor,
                   shape: AttentionShape):
        """q of the slot rows x_q = x gathered at idx (B, k), and k, v of every token x (kv_policy=all with slots).
        A fused projection runs once over every token and its q rows are gathered (a token's q is the same row
        either way); split projections compute q on the slots only."""
        if self.qkv_proj is None:
            return (self.q(attn, x_q, shape), *self.kv(attn, x, shape))
        q, k, v = self.qkv(attn, x, shape)
        return q.gather(2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])), k, v

    def q(self, attn: nn.Module, x: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
        if self.qkv_proj is not None:  # (a fused projection computes k and v of these rows too)
            return self.qkv(attn, x, shape)[0]
        norm = attn.q_norm if self.qk_norm else None
        return _heads(getattr(attn, self.q_proj)(x), shape.heads, shape.head_dim, norm)

    def kv(self, attn: nn.Module, x: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            return self.qkv(attn, x, shape)[1:]
        k_norm = attn.k_norm if self.qk_norm else None
        k = _heads(getattr(attn, self.k_proj)(x), shape.kv_heads, shape.head_dim, k_norm)
        return k, _heads(getattr(attn, self.v_proj)(x), shape.kv_heads, shape.head_dim)

    rope = staticmethod(apply_rope)

    def attn_out(self, layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """The attention output projection of (B, Q, H * D), then the post-attention module if the family has one."""
        out = getattr(getattr(layer, self.attn), self.o_proj)(out)
        return out if self.attn_post is None else getattr(layer, self.attn_post)(out)

    # ------------------------------------------------------------ MLP
    def mlp_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The MLP sublayer on (B, k, d) rows: pre-norm, the family's MLP module (a tuple's first element: MoE
        blocks that return their router logits beside the states), post module if any."""
        out = getattr(layer, self.mlp)(getattr(layer, self.mlp_norm)(x))
        if isinstance(out, tuple):
            out = out[0]
        return out if self.mlp_post is None else getattr(layer, self.mlp_post)(out)

    def lora_targets(self, names) -> list[str]:
        """Target module names translated to this family (duplicates and untranslatable names dropped)."""
        out = []
        for name in names:
            mapped = self.lora_names.get(name, name)
            if mapped is not None and mapped not in out:
                out.append(mapped)
        return out


_PHI3_LORA = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
              "up_proj": "gate_up_proj"}
# Mixtral's experts hold fused 3-D parameters (not Linear) and its expert router is not a Linear either: LoRA
# adapts attention only.
_MIXTRAL_LORA = {"gate_proj": None, "up_proj": None, "down_proj": None}

ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama"),
    "mistral": FamilyAdapter("mistral", sliding_window=_config_window),
    "qwen2": FamilyAdapter("qwen2", sliding_window=_module_window),
    "qwen3": FamilyAdapter("qwen3", qk_norm=True, sliding_window=_module_window),
    "gemma2": FamilyAdapter("gemma2", mlp_norm="pre_feedforward_layernorm", attn_post="post_attention_layernorm",
                            mlp_post="post_feedforward_layernorm", sliding_window=_module_window,
                            softcap=_module_softcap),
    "phi3": FamilyAdapter("phi3", qkv_proj="qkv_proj", attn_post="resid_attn_dropout", mlp_post="resid_mlp_dropout",
                          sliding_window=_config_window, lora_names=_PHI3_LORA),
    "mixtral": FamilyAdapter("mixtral", moe_router="gate", sliding_window=_config_window, lora_names=_MIXTRAL_LORA),
}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise SkipGPTError(f"model family {model_type!r} is not supported by skipgpt-dist: supported families are "
                           f"{', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]
