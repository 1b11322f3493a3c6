"""Per-GPU memory of a SkipGPT training run (tools/plan_memory.py): will stage 1 / stage 2 fit, and how it shards.

The model: the HF base is frozen; only routers (stage 1) or LoRA (+ optionally routers, stage 2) train.

Parameters (bytes per element `w` = 2 for bf16, 4 for fp32). Every tensor of the model is listed (embeddings, each
projection, norms, routers, LoRA A/B). FSDP2 and ZeRO-3 shard every tensor over the N ranks (numel / N each).
DeepSpeed ZeRO-3 keeps tensors smaller than `stage3_param_persistence_threshold` (default 1e5 elements: norms,
routers, small LoRA factors) whole on every rank, in addition to their partition (numel * (1 + 1/N)). ZeRO-0/1/2
replicate parameters. ZeRO-3 with offload keeps the partitions in CPU memory (only persistent tensors stay on GPU).

Gradients: only trainable tensors have them (w bytes per element); ZeRO-2/3 and FSDP2 shard them (/ N).
Optimiser (AdamW): per trainable element an fp32 master copy (when w < 4) + m + v in fp32 = 12 bytes (8 in fp32);
sharded (/ N) by every ZeRO stage >= 1 and by FSDP2; with offload they live in CPU memory. LoRA factors are fp32
(peft's autocast_adapter_dtype) except under DeepSpeed, whose bf16 engine casts them to w: their parameters and
gradients take 4 bytes and need no master copy (8 bytes of Adam state).

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
(+ the largest layer's saved set), plus the head.

Buffers / workspace: the logits (T*V*d) and their fp32 copy/gradient in the loss (T*V*f); with ZeRO-3/FSDP2 the
all-gathered parameters of two layers (the current one and one prefetched) in w bytes; DeepSpeed's gradient reduce
bucket (min(reduce_bucket_size, trainable) fp32 elements); and a fixed allowance for the CUDA context, cuBLAS/NCCL
workspaces and allocator fragmentation (--overhead-gb, default 2 GiB).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import SkipGPTError

GIB = 1024 ** 3
F32 = 4
BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj")

PRESETS = {
    "llama2-7b": dict(vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008),
    "llama2-13b": dict(vocab=32000, hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824),
    "llama2-70b": dict(vocab=32000, hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672),
    "llama3-8b": dict(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336),
    "llama3-70b": dict(vocab=128256, hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672),
    "smollm2-135m": dict(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, tied=True),
}


# ---------------------------------------------------------------- the model's shape and tensors


@dataclass
class ModelShape:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 0
    tied: bool = False
    qkv_bias: bool = False

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, config: dict, name: str = "config.json") -> "ModelShape":
        try:
            heads = int(config["num_attention_heads"])
            return cls(name=name, vocab=int(config["vocab_size"]), hidden=int(config["hidden_size"]),
                       layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       intermediate=int(config["intermediate_size"]), head_dim=int(config.get("head_dim") or 0),
                       tied=bool(config.get("tie_word_embeddings", False)),
                       qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")))
        except (KeyError, TypeError, ValueError) as err:
            raise SkipGPTError(f"{name} is not a decoder config this planner understands (missing or bad {err}): "
                               "give a Llama/Mistral/Qwen2 config.json or a preset") from None

    @classmethod
    def load(cls, spec: str) -> "ModelShape":
        """A preset name, a config.json path, or a model folder holding one."""
        if spec in PRESETS:
            return cls(name=spec, **PRESETS[spec])
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise SkipGPTError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / model "
                               "folder: pass one of those")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SkipGPTError(f"{path} is not readable JSON ({err}): give a Hugging Face config.json") from None
        return cls.from_config(config, name=str(path))

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """module -> (in_features, out_features) of each projection of one layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass
class Tensor:
    numel: int
    trainable: bool
    count: int = 1  # identical tensors (e.g. the same projection in every layer)
    kind: str = "base"  # base | router | lora


def model_tensors(m: ModelShape, stage: int, lora_r: int, lora_targets: list[str], router_type: str,
                  train_routers: bool) -> Iterator[Tensor]:
    """Every parameter tensor of the routed (and, in stage 2, LoRA-adapted) model."""
    L, h = m.layers, m.hidden
    yield Tensor(m.vocab * h, False)
    if not m.tied:
        yield Tensor(m.vocab * h, False)
    yield Tensor(h, False)  # final norm
    for module, (n_in, n_out) in m.linear_dims().items():
        yield Tensor(n_in * n_out, False, L)
        if m.qkv_bias and module in ATTN_TARGETS:
            yield Tensor(n_out, False, L)
    yield Tensor(h, False, 2 * L)  # the two norms of each layer
    routers_train = stage == 1 or train_routers
    for shape in router_shapes(h, router_type):
        yield Tensor(shape, routers_train, 2 * L, "router")
    if stage == 2:
        dims = m.linear_dims()
        for module in lora_targets:
            n_in, n_out = dims[module]
            yield Tensor(lora_r * n_in, True, L, "lora")
            yield Tensor(n_out * lora_r, True, L, "lora")


def router_shapes(hidden: int, router_type: str) -> list[int]:
    if router_type == "linear":
        return [2 * hidden, 2]
    mid = max(1, hidden // 4)
    return [mid * hidden, mid, 2 * mid, 2]


# ---------------------------------------------------------------- the training set-up


@dataclass
class Setup:
    nodes: int = 1
    gpus_per_node: int = 8
    backend: str = "deepspeed"  # deepspeed | fsdp2 | none (one GPU, plain PyTorch)
    zero_stage: int = 3
    offload: bool = False
    seq_len: int = 4096
    micro_batch: int = 1
    activation_checkpointing: bool = True
    stage: int = 1
    lora_r: int = 16
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj", "gate_proj"])
    lora_dropout: float = 0.1
    train_routers: bool = False
    router_type: str = "linear"
    dtype: str = "bf16"
    gpu_memory_gb: float = 80.0
    mode: str = "capacity"
    capacity: float = 1.0
    attn_impl: str = "flash"  # flash (GPU: FlashAttention / FlexAttention) | sdpa (explicit mask, CPU)
    persistence_threshold: int = 100_000
    reduce_bucket_size: int = 50_000_000
    overhead_gb: float = 2.0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def w(self) -> int:
        return BYTES[self.dtype]

    @property
    def sharded_params(self) -> bool:
        return self.backend == "fsdp2" or (self.backend == "deepspeed" and self.zero_stage == 3)

    def validate(self) -> "Setup":
        checks = [(self.backend in ("deepspeed", "fsdp2", "none"), "--backend must be deepspeed, fsdp2 or none"),
                  (self.zero_stage in (0, 1, 2, 3), "--zero-stage must be 0, 1, 2 or 3"),
                  (self.nodes >= 1 and self.gpus_per_node >= 1, "--nodes and --gpus-per-node must be >= 1"),
                  (self.seq_len >= 2 and self.micro_batch >= 1, "--seq-len must be >= 2 and --micro-batch >= 1"),
                  (self.stage in (1, 2), "--stage must be 1 or 2"),
                  (self.dtype in BYTES, f"--dtype must be one of {', '.join(BYTES)}"),
                  (0 < self.capacity <= 1, "--capacity must be in (0, 1]"),
                  (self.mode in ("mask", "capacity", "expert_choice"),
                   "--mode must be mask, capacity or expert_choice"),
                  (self.attn_impl in ("flash", "sdpa"), "--attn-impl must be flash or sdpa"),
                  (self.router_type in ("linear", "mlp"), "--router-type must be linear or mlp"),
                  (not self.offload or self.backend == "deepspeed", "--offload needs --backend deepspeed"),
                  (self.backend != "none" or self.world == 1, "--backend none is one GPU: --nodes 1 --gpus-per-node 1"),
                  (self.stage == 1 or self.lora_r >= 1, "--lora-r must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise SkipGPTError(message)
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if self.stage == 2 and (bad or not self.lora_targets):
            raise SkipGPTError(f"--lora-targets {bad or '(none)'}: use names among {', '.join(LORA_TARGETS)}")
        return self


# ---------------------------------------------------------------- parameters, gradients, optimiser


def _held(numel: int, s: Setup, persistent_ok: bool = True) -> tuple[float, float]:
    """(elements on the GPU, elements in CPU memory) of one parameter tensor on one rank."""
    n = s.world
    if not s.sharded_params:
        return float(numel), 0.0
    if s.backend == "deepspeed" and persistent_ok and numel < s.persistence_threshold:
        return numel * (1 + 1 / n), 0.0  # whole copy + its partition
    return (0.0, numel / n) if s.offload else (numel / n, 0.0)


def parameter_counts(m: ModelShape, s: Setup) -> dict:
    tensors = list(model_tensors(m, s.stage, s.lora_r, s.lora_targets, s.router_type, s.train_routers))
    total = sum(t.numel * t.count for t in tensors)
    trainable = sum(t.numel * t.count for t in tensors if t.trainable)
    gpu = sum(_held(t.numel, s)[0] * t.count for t in tensors)
    lora_gpu = sum(_held(t.numel, s)[0] * t.count for t in tensors if t.kind == "lora")
    cpu = sum(_held(t.numel, s)[1] * t.count for t in tensors)
    return {"total": total, "trainable": trainable,
            "routers": sum(t.numel * t.count for t in tensors if t.kind == "router"),
            "lora": sum(t.numel * t.count for t in tensors if t.kind == "lora"),
            "held_per_rank": gpu, "offloaded_per_rank": cpu, "lora_held_per_rank": lora_gpu,
            "layer": sum(t.numel * t.count // m.layers for t in tensors if t.count >= m.layers),
            "root": sum(t.numel * t.count for t in tensors if t.count < m.layers)}


def _grad_shards(s: Setup) -> int:
    return s.world if s.backend == "fsdp2" or (s.backend == "deepspeed" and s.zero_stage >= 2) else 1


def _optim_shards(s: Setup) -> int:
    return s.world if s.backend == "fsdp2" or (s.backend == "deepspeed" and s.zero_stage >= 1) else 1


# ---------------------------------------------------------------- activations


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


# ---------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    model: ModelShape
    setup: Setup
    params: dict
    rows: dict  # component -> bytes per GPU
    notes: dict  # component -> how it was computed
    cpu_bytes: float
    activations: dict

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.setup.gpu_memory_gb * GIB

    def max_micro_batch(self) -> int:
        """The largest micro-batch that fits (activations and logits grow linearly with it)."""
        scaling = ("activations", "AC recompute", "logits + loss")
        per_sample = sum(self.rows[k] for k in scaling) / self.setup.micro_batch
        fixed = self.total - per_sample * self.setup.micro_batch
        return max(0, int((self.setup.gpu_memory_gb * GIB - fixed) // per_sample)) if per_sample > 0 else 0

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "setup": asdict(self.setup), "params": self.params,
                "bytes_per_gpu": self.rows, "total_bytes_per_gpu": self.total, "fits": self.fits,
                "cpu_bytes_per_gpu": self.cpu_bytes, "activations": self.activations, "notes": self.notes,
                "max_micro_batch": self.max_micro_batch()}


def _trainable_bytes(p: dict, s: Setup) -> tuple[float, float, str, str]:
    """(gradient bytes, optimiser bytes per rank, how each was counted). Routers take w bytes, LoRA lora_bytes."""
    w, lw = s.w, lora_bytes(s)
    routers = p["trainable"] - p["lora"]
    adam = {b: (3 * F32 if b < F32 else 2 * F32) for b in (w, lw)}
    grads = (routers * w + p["lora"] * lw) / _grad_shards(s)
    optim = (routers * adam[w] + p["lora"] * adam[lw]) / _optim_shards(s)
    parts = [(routers, w, "routers"), (p["lora"], lw, "LoRA")]
    grad_how = " + ".join(f"{name} {n / 1e6:.2f} M x {b} B" for n, b, name in parts if n) + f" / {_grad_shards(s)}"
    optim_how = (" + ".join(f"{name} x {adam[b]} B" for n, b, name in parts if n)
                 + f" (fp32 master if needed + m + v) / {_optim_shards(s)}")
    return grads, optim, grad_how, optim_how


def plan_memory(m: ModelShape, s: Setup) -> MemoryPlan:
    s.validate()
    p = parameter_counts(m, s)
    w = s.w
    grads, optim, grad_how, optim_how = _trainable_bytes(p, s)
    acts = activation_bytes(m, s)
    gather = 0.0
    if s.sharded_params:  # FSDP2's root group (embeddings, head) stays unsharded from forward to backward
        gather = (2 * p["layer"] + (p["root"] if s.backend == "fsdp2" else 0)) * w
    bucket = min(s.reduce_bucket_size, p["trainable"]) * F32 if s.backend == "deepspeed" else 0.0
    rows = {"parameters": p["held_per_rank"] * w + p["lora_held_per_rank"] * (lora_bytes(s) - w),
            "gradients": 0.0 if s.offload else grads,
            "optimizer states": 0.0 if s.offload else optim,
            "activations": acts["saved"], "AC recompute": acts["recompute"], "logits + loss": logits_bytes(m, s),
            "all-gather buffers": gather + bucket, "CUDA context + workspace": s.overhead_gb * GIB}
    notes = _notes(m, s, p, acts, grad_how, optim_how)
    # offload: the parameter partitions, fp32 gradient partitions and the optimiser live in CPU memory
    cpu = p["offloaded_per_rank"] * w + ((p["trainable"] * F32 / s.world + optim) if s.offload else 0.0)
    return MemoryPlan(model=m, setup=s, params=p, rows=rows, notes=notes, cpu_bytes=cpu, activations=acts)


def _notes(m: ModelShape, s: Setup, p: dict, acts: dict, grad_how: str, optim_how: str) -> dict:
    how = "sharded" if s.sharded_params else "replicated"
    offloaded = " (offloaded to CPU)" if s.offload else ""
    gather = ("2 layers unsharded" + (" + root (embeddings, head)" if s.backend == "fsdp2" else "")
              if s.sharded_params else "none (replicated)")
    return {"parameters": f"{p['total'] / 1e9:.2f} B x {s.w} B, {how}{offloaded}",
            "gradients": grad_how + offloaded, "optimizer states": optim_how + offloaded,
            "activations": (f"checkpointed: {m.layers} layer inputs + head" if s.activation_checkpointing
                            else f"{m.layers} layers x {acts['per_layer'] / GIB:.3f} GiB + head"),
            "AC recompute": (f"one layer recomputed ({acts['per_layer'] / GIB:.3f} GiB) beyond the head phase"
                             if s.activation_checkpointing else "none (no checkpointing)"),
            "logits + loss": f"{s.micro_batch * s.seq_len} tokens x vocab {m.vocab} x ({s.w} + 4 + {s.w}) B",
            "all-gather buffers": gather + (" + reduce bucket" if s.backend == "deepspeed" else ""),
            "CUDA context + workspace": "fixed allowance (--overhead-gb)"}


def format_plan(plan: MemoryPlan) -> str:
    m, s, p = plan.model, plan.setup, plan.params
    backend = {"deepspeed": f"DeepSpeed ZeRO-{s.zero_stage}" + (" + CPU offload" if s.offload else ""),
               "fsdp2": "FSDP2", "none": "one GPU"}[s.backend]
    train = "routers" if s.stage == 1 else (f"LoRA r={s.lora_r} on {','.join(s.lora_targets)}"
                                            + (" + routers" if s.train_routers else ""))
    routers_trained = s.stage == 1 or s.train_routers
    parts = ([f"routers {p['routers'] / 1e6:.2f} M"] if routers_trained else []) + \
        ([f"LoRA {p['lora'] / 1e6:.2f} M"] if p["lora"] else [])
    frozen = "" if routers_trained else f"; routers {p['routers'] / 1e6:.2f} M frozen"
    lines = [f"model {m.name}: {p['total'] / 1e9:.2f} B parameters ({m.layers} layers, hidden {m.hidden}, "
             f"heads {m.heads}/{m.kv_heads}, vocab {m.vocab}); trainable {p['trainable'] / 1e6:.2f} M "
             f"({' + '.join(parts)}{frozen})",
             f"setup: {s.nodes} node(s) x {s.gpus_per_node} GPUs = {s.world} ranks, {backend}, {s.dtype}, stage "
             f"{s.stage} ({train}), seq {s.seq_len} x micro-batch {s.micro_batch}, activation checkpointing "
             f"{'on' if s.activation_checkpointing else 'off'}, mode {s.mode} (capacity {s.capacity:g}), "
             f"attention {s.attn_impl}",
             f"{'per-GPU memory':<28}{'GiB':>9}  how"]
    for name, value in plan.rows.items():
        lines.append(f"  {name:<26}{value / GIB:>9.2f}  {plan.notes[name]}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {'total':<26}{plan.total / GIB:>9.2f}  of {s.gpu_memory_gb:g} GiB: {verdict} "
                 f"({100 * plan.total / (s.gpu_memory_gb * GIB):.0f}% used; largest micro-batch that fits: "
                 f"{plan.max_micro_batch()})")
    if plan.cpu_bytes:
        lines.append(f"  CPU memory per GPU (offloaded): {plan.cpu_bytes / GIB:.2f} GiB")
    return "\n".join(lines)
