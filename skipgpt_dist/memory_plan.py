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

Activations: see memory_activations.py (what autograd saves per token, term by term).

Buffers / workspace: the logits (T*V*d) and their fp32 copy/gradient in the loss (T*V*f); with ZeRO-3/FSDP2 the
all-gathered parameters of two layers (the current one and one prefetched) in w bytes; DeepSpeed's gradient reduce
bucket (min(reduce_bucket_size, trainable) fp32 elements); and a fixed allowance for the CUDA context, cuBLAS/NCCL
workspaces and allocator fragmentation (--overhead-gb, default 2 GiB).

The inputs (model shape, set-up) are memory_shapes.py; their names are importable from here too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .memory_activations import (activation_bytes, head_activation_bytes, layer_activation_bytes,  # noqa: F401
                                 logits_bytes, lora_bytes)
from .memory_shapes import (ATTN_TARGETS, BYTES, F32, GIB, LORA_TARGETS, PRESETS, ModelShape, Setup,  # noqa: F401
                            Tensor, model_tensors, router_shapes)

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
