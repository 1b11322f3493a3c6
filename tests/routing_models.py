"""Tiny random HF models of every supported family, with routers whose decisions vary per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, \
    MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, \
    Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from skipgpt_dist import RouterConfig, attach_routers, sparsity_loss

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
    # q/k RMSNorms per head; head_dim 16 != hidden / heads; the middle layer slides (window 5), the others are full
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=5,
        layer_types=["full_attention", "sliding_attention", "full_attention"], **COMMON)),
    # sliding (window 5) / full / sliding layers, attention and final logit soft-capping, query_pre_attn_scalar 16
    # != head_dim 12, sandwich norms, scaled and tied embeddings. Initialised at 0.2 (not 0.02) so the attention
    # scores reach the soft cap: at 0.02 dropping attn_logit_softcapping changes the logits by 6e-6, at 0.2 by 1.6.
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=16, sliding_window=5,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, initializer_range=0.2,
        **{**COMMON, "tie_word_embeddings": True})),
    # fused qkv_proj and gate_up_proj; RoPE on half of each head (partial_rotary_factor 0.5: 6 of 12 dims)
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=None, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, **COMMON)),
    # a sparse MoE MLP: 4 experts, top-2 per token (its router logits are recorded by a hook for the aux loss)
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(num_attention_heads=4, num_key_value_heads=2,
                                                        num_local_experts=4, num_experts_per_tok=2, **COMMON)),
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


def logits_on_real(model, ids, mask):
    return model(ids, attention_mask=mask).logits[mask.bool()]


def train_step_grads(model, ids, mask):
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_("skipgpt_" in name)
    logits = model(ids, attention_mask=mask).logits
    # no loss on a prediction made at a padding position (left padding's last pad predicts the first token): mask
    # mode's dense estimator would give that pad's router a gradient, which padding never gets in real training
    labels = ids.masked_fill(mask == 0, -100)[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    (loss + sparsity_loss(model)).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
