"""Helpers shared by the benchmarks: timing (CPU wall clock; a CUDA sync when tensors live on a GPU), the FLOP
model behind every "ideal" ratio, and what a router's Linear reads."""
from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device=None) -> float:
    """Seconds one call of fn takes; the garbage collector is kept out of the timed region."""
    gc.collect()
    gc.disable()
    try:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start
    finally:
        gc.enable()


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep every page it has faulted in: no mmap'd chunks (those go back to the OS on free) and
    no trimming of the heap. Once the heap has grown to the working set (a few calls: an aligned allocation does not
    always fit the chunk just freed), a timed call reuses pages an earlier call touched. Otherwise whether a call pays
    first-touch page faults (~50 ms for the 49k pages of a forward's 201 MB logits buffer at SmolLM2 shape) depends
    on the heap's state at that moment, and it hits variants at random: up to +-0.03 on a time ratio, noise that has
    nothing to do with the code measured. Linux/glibc only; elsewhere nothing changes (returns False)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # glibc <malloc.h>
    int_max = 2 ** 31 - 1  # mallopt takes a C int
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, int_max)
                and libc.mallopt(m_top_pad, 256 << 20))


def add_allocator_option(parser) -> None:
    parser.add_argument("--allocator", choices=("keep", "default"), default="keep",
                        help="keep (default): glibc keeps freed memory, so no timed call pays first-touch page faults "
                             "that depend on the heap's state (see bench.common.keep_freed_memory); default: as is")


def apply_allocator(choice: str) -> str:
    """Apply --allocator; returns what the run used ("keep" or "default") and prints it."""
    used = "keep" if choice == "keep" and keep_freed_memory() else "default"
    print("allocator: " + ("glibc keeps freed memory (no heap-state-dependent page faults in timed calls)"
                           if used == "keep" else "as is (timed calls may pay first-touch page faults, depending on "
                                                  "the heap's state)"))
    return used


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is unavailable)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def round_robin(names: Sequence[str], repeats: int, measure: Callable[[str], dict[str, float]],
                rotate: bool = True, label: str = "") -> dict[str, dict[str, list[float]]]:
    """Run measure(name) for every name once per repeat, interleaved, so load noise hits every variant alike.

    The starting variant rotates each repeat (no variant always runs first or last). Returns
    {name: {metric: [one value per repeat]}}.
    """
    out: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for rep in range(repeats):
        shift = rep % len(names) if rotate else 0
        for name in list(names[shift:]) + list(names[:shift]):
            for metric, value in measure(name).items():
                out[name].setdefault(metric, []).append(value)
        print(f"[bench] {label}repeat {rep + 1}/{repeats} done", file=sys.stderr, flush=True)
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------------------------------------------
# FLOP model
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    layers: int
    d: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int


def shape_of(config) -> Shape:
    """The Shape of a Hugging Face Llama-style config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(config.num_hidden_layers, config.hidden_size, heads,
                 getattr(config, "num_key_value_heads", None) or heads, head_dim, config.intermediate_size,
                 config.vocab_size)


def flop_parts(shape: Shape, seq_len: int, head_tokens: Optional[int] = None) -> dict[str, float]:
    """Matmul FLOPs of one forward over one sequence of seq_len tokens (2 FLOPs per multiply-add).

    Per token and layer: q,o projections 2*2*d*H*Dh; k,v projections 2*2*d*Hkv*Dh; MLP (3 matrices) 2*3*d*I.
    Causal attention (scores QK^T and values PV) over S tokens: 2*2*H*Dh * S(S+1)/2 in total per layer.
    LM head 2*d*V per token, for head_tokens tokens (default all; generation's prefill needs only the last).
    Norms, RoPE, softmax, embedding lookup, routers (~0.06%) are left out.
    """
    s, L = seq_len, shape.layers
    return {
        "qo": 2 * 2 * shape.d * shape.heads * shape.head_dim * s * L,
        "kv": 2 * 2 * shape.d * shape.kv_heads * shape.head_dim * s * L,
        "attn": 2 * 2 * shape.heads * shape.head_dim * s * (s + 1) / 2 * L,
        "mlp": 2 * 3 * shape.d * shape.inter * s * L,
        "head": 2 * shape.d * shape.vocab * (s if head_tokens is None else head_tokens),
    }


def decode_flop_parts(shape: Shape, context: int) -> dict[str, float]:
    """flop_parts of one decoded token that attends `context` cached tokens (plus itself)."""
    parts = flop_parts(shape, 1)
    parts["attn"] = 2 * 2 * shape.heads * shape.head_dim * (context + 1) * shape.layers
    return parts


def ideal_ratio(parts: dict[str, float], attn: float, kv_policy: str, train: bool = False,
                mlp: Optional[float] = None) -> float:
    """FLOPs of a routed pass over FLOPs of the dense pass, when a fraction `attn` of tokens executes attention
    and `mlp` (default: attn, e.g. a capacity factor for both) executes the MLP.

    kv_policy=all: q/o projections and the attention of the executed queries (over all earlier keys) scale by
    attn; K/V projections and the LM head never skip. kv_policy=routed: K/V projections also scale by attn, and
    attention by attn^2 (executed queries over executed keys). The MLP scales by mlp.
    (facts.md's 0.797 / 0.674 for `routed` scale attention by c, not c^2, hence slightly higher.)

    train=False: the forward ratio, which is also the ideal the issue sets for the router-training step.
    train=True: a refinement for that step with a frozen base: each projection/MLP/LM-head matmul costs forward +
    input-gradient = 2x its forward FLOPs (no weight gradients), attention costs forward + dQ, dK, dV
    (P V and Q K^T each give two backward matmuls) = 3x. Routers and the loss are ignored.
    """
    a, m = attn, attn if mlp is None else mlp
    scale = {"qo": a, "kv": 1.0 if kv_policy == "all" else a, "attn": a if kv_policy == "all" else a * a,
             "mlp": m, "head": 1.0}
    weights = {"qo": 2, "kv": 2, "attn": 3, "mlp": 2, "head": 2} if train else dict.fromkeys(parts, 1)
    total = sum(weights[k] * v for k, v in parts.items())
    return sum(weights[k] * scale[k] * v for k, v in parts.items()) / total


def flop_shares(parts: dict[str, float]) -> dict[str, float]:
    total = sum(parts.values())
    return {"attention_sublayer": (parts["qo"] + parts["kv"] + parts["attn"]) / total,
            "kv_projections": parts["kv"] / total, "mlp": parts["mlp"] / total, "lm_head": parts["head"] / total}


def router_linear_input(args) -> "torch.Tensor":
    """What a router's Linear reads, from its forward-hook args: the input, times the router's per-token input
    scale when one is passed (routers scale the Linear's outputs instead of its input)."""
    x = args[0].detach()
    return x * args[1] if len(args) > 1 and args[1] is not None else x


# ----------------------------------------------------------------------------------------------------------------
# Model shapes (random weights) and the device / dtype options shared by the benches
# ----------------------------------------------------------------------------------------------------------------
# --shape NAME: a random-weight LlamaForCausalLM of this shape (the one home of these numbers: routed_forward.py and
# generate.py both build from here). `smollm2` is SmolLM2-135M's shape; `llama2-7b-4l` is a 4-layer slice of
# Llama-2-7B (about 1.07B parameters with its embeddings and LM head).
SHAPES = {
    "smollm2": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    hidden_act="silu", tie_word_embeddings=True),
    "llama2-7b-4l": dict(num_hidden_layers=4, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         hidden_act="silu", tie_word_embeddings=False),
}
DTYPES = ("float32", "bfloat16", "float16")


def shape_config(name: str, layers: Optional[int] = None, max_positions: Optional[int] = None, **overrides):
    """The LlamaConfig of SHAPES[name] (read at call time), with num_hidden_layers=layers and
    max_position_embeddings >= max_positions when given; further keyword arguments go to LlamaConfig."""
    from transformers import LlamaConfig

    kwargs = dict(SHAPES[name])
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    if max_positions is not None:
        kwargs["max_position_embeddings"] = max(kwargs.get("max_position_embeddings", 0), max_positions)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_random_model(config, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """A random-weight causal LM of `config`, created directly on `device` in `dtype` (no fp32 CPU copy of a
    1B-parameter model first), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def add_device_options(parser, default_dtype_cpu: str = "float32", default_dtype_cuda: str = "bfloat16") -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the models run and are timed (cuda: torch.cuda.synchronize() around every timed "
                             "region, warm-up calls first, --allocator ignored, memory = torch.cuda.max_memory_allocated)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help=f"model dtype (default {default_dtype_cpu} on cpu, {default_dtype_cuda} on cuda; "
                             "routers stay fp32)")
    parser.set_defaults(_dtype_defaults=(default_dtype_cpu, default_dtype_cuda))


def resolve_device_options(args) -> None:
    """Fill args.dtype's device default; fail early when --device cuda has no GPU."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
    if args.dtype is None:
        args.dtype = args._dtype_defaults[args.device == "cuda"]


def device_allocator(args) -> str:
    """--allocator on cpu (apply_allocator); on cuda it is glibc host-heap control, irrelevant to GPU timings:
    ignored, and recorded as such."""
    if args.device == "cuda":
        print(f"allocator: --allocator {args.allocator} ignored on cuda (glibc host-heap control; GPU memory is "
              "the caching allocator's)")
        return f"ignored (cuda; --allocator {args.allocator})"
    return apply_allocator(args.allocator)


def device_record(device: str) -> dict:
    """What a bench's JSON records about where it ran."""
    out = {"device": device, "torch": torch.__version__}
    if device == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    else:
        import platform

        out["device_name"] = platform.processor() or platform.machine()
    return out


def cuda_peak_start(device) -> int:
    """Start a peak-memory window on cuda (returns the bytes allocated now); 0 elsewhere."""
    if torch.device(device).type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def cuda_peak_mib(device, start: int) -> float:
    """Peak bytes allocated since cuda_peak_start, above what was allocated then (weights, caches), in MiB."""
    sync(device)
    return (torch.cuda.max_memory_allocated() - start) / 2 ** 20
