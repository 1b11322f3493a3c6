"""Activation memory of a SkipGPT training step, per GPU.


Activations (per micro-batch of T = micro_batch * seq_len tokens; d = w, f = 4 bytes): what autograd saves for
backward, counted per token for one routed Llama block (calibrated against saved-tensor hooks on CPU, see
tests/test_memory_plan.py). Frozen projections save nothing for their own weights, so a layer saves:
  A  attention RMSNorm input, upcast to fp32:   h*f + f            if the layer input carries grad
  B  router's bf16 copy of the layer input:     h*d + f            same, and only when d != f (fp32 shares it)
  C  router inputs (normalised), 2 routers:     2*h*d              if routers train
  D  attention internals (q, k, v, out, lse):   flash: (2*nh*c + 2*nkv)*hd*d + nh*f*c;  sdpa (CPU): k/v expanded
                                                to nh heads + an explicit S*c*d mask;  + 2*hd*d in capacity mode
                                                if attention inputs carry grad (layer input, or LoRA on q/k/v)
  E  sublayer outputs kept for the gate product: 2*h*d*c           if the gates carry grad
  F  MLP RMSNorm input, fp32:                   h*f*c + f          if the MLP input carries grad
  G  MLP internals (gate, silu, up):            3*I*d*c            same, or LoRA on gate/up
  H  LoRA (adapter dtype l: fp32 as peft keeps it, or bf16 under DeepSpeed's bf16 engine): per module its
     input in l (shared by modules reading the same tensor when dropout is 0 and l == d, else one cast copy each;
     with dropout a dropped copy + the mask, 2*n_in*l) + A x (r*l)
  I  capacity/expert_choice gathers and slot indices: 2*h*d*c + 64
  J  router logits, gates, scores:              48
with c = capacity (fraction of tokens a sublayer executes; 1 in mask mode). The first layer's input comes from the
frozen embedding and carries no grad, so it saves less (A, B, and D unless LoRA adapts q/k/v). The head saves the
final norm input (h*f + f) and the fp32 log-probabilities of the loss ((S-1)/S * V*f per token).
With activation checkpointing: each layer keeps only its input (h*d per token) and one layer is recomputed at a time
"""
from __future__ import annotations

from .memory_shapes import ATTN_TARGETS, F32, ModelShape, Setup


def layer_activation_bytes(m: ModelShape, s: Setup, first: bool = False) -> float:
    """Bytes one routed layer saves for backward for one micro-batch (terms A-J of the module docstring)."""
    d, f = s.w, F32
    h, I, nh, nkv, hd, S = m.hidden, m.intermediate, m.heads, m.kv_heads, m.head_dim, s.seq_len
    c = 1.0 if s.mode == "mask" else s.capacity
    routers_train = s.stage == 1 or s.train_routers
    targets = set(s.lora_targets) if s.stage == 2 else set()
    grad_in = not first
    attn_lora = bool(targets & set(ATTN_TARGETS))
    per_token = 48.0  # J
    if grad_in:
        per_token += h * f + f  # A
        if d != f:
            per_token += h * d + f  # B
    if routers_train:
        per_token += 2 * h * d  # C
    if grad_in or attn_lora:
        per_token += _attention_saved(s, nh, nkv, hd, S, c, d, f)  # D
    if routers_train or grad_in:
        per_token += 2 * h * d * c  # E
    mlp_grad = grad_in or routers_train or attn_lora or "o_proj" in targets
    if mlp_grad:
        per_token += h * f * c + f  # F
    if mlp_grad or targets & {"gate_proj", "up_proj"}:
        per_token += 3 * I * d * c  # G
    per_token += _lora_saved(m, s, targets, c, d)  # H
    if s.mode != "mask":
        per_token += 2 * h * d * c + 64  # I
    return per_token * s.micro_batch * S


def _attention_saved(s: Setup, nh, nkv, hd, S, c, d, f) -> float:
    kv_heads = nh if s.attn_impl == "sdpa" else nkv
    saved = (2 * nh * c + 2 * kv_heads) * hd * d + nh * f * c
    if s.attn_impl == "sdpa":
        saved += S * c * d  # the explicit boolean-turned-additive mask
    if s.mode != "mask":
        saved += 2 * hd * d  # cos/sin gathered at the executed queries' positions
    return saved


def lora_bytes(s: Setup) -> int:
    """Bytes per LoRA element: peft keeps adapters in fp32 under a bf16/fp16 base (autocast_adapter_dtype), except
    that DeepSpeed's bf16 engine casts the whole module to bf16."""
    return s.w if s.backend == "deepspeed" else F32


def _lora_saved(m: ModelShape, s: Setup, targets: set, c: float, d: int) -> float:
    if not targets:
        return 0.0
    ld = lora_bytes(s)
    dims = m.linear_dims()
    q_share = c if s.mode != "mask" else 1.0
    token_share = {"q_proj": q_share, "k_proj": 1.0, "v_proj": 1.0, "o_proj": c, "gate_proj": c, "up_proj": c,
                   "down_proj": c}
    groups = {"q_proj": "x_q" if s.mode != "mask" else "x", "k_proj": "x", "v_proj": "x", "o_proj": "o",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}
    saved, seen = 0.0, set()
    for module in sorted(targets):
        n_in, share = dims[module][0], token_share[module]
        saved += s.lora_r * ld * share  # A x, kept for B's gradient
        if s.lora_dropout > 0:
            # each adapter drops its own copy of the input and keeps the mask (saved at ld bytes on CPU; a 1-byte
            # mask on CUDA makes this a slight overestimate there)
            saved += 2 * n_in * ld * share
        elif ld != d or groups[module] not in seen:
            seen.add(groups[module])  # cast to the adapter dtype separately per module, else shared
            saved += n_in * ld * share
    return saved


def head_activation_bytes(m: ModelShape, s: Setup) -> float:
    tokens = s.micro_batch * s.seq_len
    return tokens * (m.hidden * F32 + F32) + s.micro_batch * (s.seq_len - 1) * m.vocab * F32


def logits_bytes(m: ModelShape, s: Setup) -> float:
    """The logits (d), then in backward the gradient of their fp32 copy (f) and their own gradient (d)."""
    return s.micro_batch * s.seq_len * m.vocab * (2 * s.w + F32)


def activation_bytes(m: ModelShape, s: Setup) -> dict:
    """saved: what backward needs at its start (all layers + head; with checkpointing the layer inputs + head).
    recompute: with checkpointing, what recomputing one layer adds on top of the peak of the head phase (the
    logits and their gradients are freed by then). The peak is saved + logits + recompute."""
    first, rest = layer_activation_bytes(m, s, first=True), layer_activation_bytes(m, s)
    head = head_activation_bytes(m, s)
    if s.activation_checkpointing:
        inputs = m.layers * s.micro_batch * s.seq_len * m.hidden * s.w
        saved = inputs + head
        recompute = max(0.0, max(first, rest) - head - logits_bytes(m, s))
    else:
        inputs, recompute = 0.0, 0.0
        saved = first + (m.layers - 1) * rest + head
    return {"saved": saved, "recompute": recompute, "per_layer": rest, "first_layer": first, "head": head,
            "checkpointed_inputs": inputs}
