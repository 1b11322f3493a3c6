"""The inputs of a memory plan (tools/plan_memory.py): the model's shape and every tensor it holds (embeddings, each
projection, norms, routers, LoRA A/B), and the training set-up (back end, ranks, precision, batch, stage)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
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
