"""Tiny random HF models of every supported family, with routers whose decisions vary per token."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
    Qwen2ForCausalLM

from skipgpt_dist import RouterConfig, attach_routers

COMMON = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, vocab_size=97,
              max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)

FAMILIES = {
    "llama_mha": lambda: LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **COMMON)),
    "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(
        num_attention_heads=6, num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(num_attention_heads=4, num_key_value_heads=2,
                                                        sliding_window=7, **COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON)),
}


def build(family: str, seed: int = 0, skip_shift: float = 0.0, **router_kwargs):
    """A float32 eval-mode model with routers that execute roughly 2/3 of the tokens (fewer with skip_shift)."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().float().eval()
    attach_routers(model, RouterConfig(**router_kwargs))
    scramble_routers(model, seed, skip_shift)
    return model


def scramble_routers(model, seed: int, skip_shift: float = 0.0) -> None:
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "skipgpt_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * (8.0 if param.dim() > 1 else 0.3))
                if name.endswith("net.bias"):
                    param[1] += skip_shift


def batch(seed: int, batch_size: int = 3, seq_len: int = 19, padding: str = "none", vocab: int = 97):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if padding != "none":
        for row in range(1, batch_size):
            pad = 2 + 3 * row
            if padding == "left":
                mask[row, :pad] = 0
            else:
                mask[row, -pad:] = 0
    return ids, mask
