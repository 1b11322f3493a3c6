"""The typed training-config tree: defaults <- YAML file <- `key.sub=value` overrides, validated on load.

Each section is a dataclass that owns its defaults. Types come from the annotations (walked generically with
`dataclasses.fields` + `typing.get_type_hints`); ranges and choices live in each field's metadata
(`num_field(...)`, `choice_field(...)`; the machinery is config_fields.py), so adding a key is one line. Every user
mistake is a one-line `SkipGPTError` that names the key (`optim.lr`, `routers.capacity`, ...) and the fix.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import yaml

from .config_fields import Section, choice_field, list_field, num_field, section_field, section_from_dict
from .errors import SkipGPTError, read_user_file
from .routing.config import RouterConfig

FP32_MAX = 3.4028234663852886e38  # the largest finite float32


@dataclass
class ModelConfig(Section):
    _prefix: ClassVar[str] = "model"
    # A Hugging Face model folder, or `builtin:smollm2-135m` / `builtin:tiny` (prepared by skipgpt_dist.assets).
    path: str = "builtin:smollm2-135m"
    # Dtype the base weights are loaded in.
    dtype: str = choice_field("float32", ("float32", "bfloat16"))
    # Pass trust_remote_code to transformers (only for model folders you trust).
    trust_remote_code: bool = False


@dataclass
class DataConfig(Section):
    _prefix: ClassVar[str] = "data"
    # Training text: local files (.jsonl, .parquet, .txt), `datasets` folders, or `builtin:shakespeare-train`.
    train_files: list[str] = list_field("builtin:shakespeare-train", nonempty=True)
    # Held-out text for eval perplexity, same forms as train_files.
    eval_files: list[str] = list_field("builtin:shakespeare-eval")
    # File format; `auto` picks it from each file's extension, and reads a folder holding manifest.json (written by
    # tools/prepare_data.py) as token shards read lazily; `shards` requires train_files to be such a folder.
    format: str = choice_field("auto", ("auto", "jsonl", "parquet", "text", "dataset", "shards"))
    # Field holding the text in jsonl / parquet / dataset records.
    text_field: str = "text"
    # Tokens per packed training sequence.
    seq_len: int = num_field(512, ge=2)
    # Number of packed held-out sequences used for eval perplexity.
    eval_sequences: int = num_field(16, ge=1)
    # Seed of the data order; null -> the top-level `seed`.
    shuffle_seed: Optional[int] = None
    # Raw files only: tokenise them into token shards under run_dir/data_cache first (local rank 0 of each node;
    # the node's other ranks poll for the manifest, no collective), then read those lazily like prepared shards.
    # null (default): on when the run has several ranks (no rank waits in a collective while another tokenises).
    cache_shards: Optional[bool] = None


@dataclass
class OptimConfig(Section):
    _prefix: ClassVar[str] = "optim"
    # Peak learning rate (AdamW).
    lr: float = num_field(1e-3, gt=0)
    weight_decay: float = num_field(0.0, ge=0)
    # AdamW (beta1, beta2), each in [0, 1).
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = num_field(1e-8, gt=0)
    # `cosine`: linear warmup then cosine decay to lr * min_lr_ratio; `constant`: warmup then flat.
    schedule: str = choice_field("cosine", ("cosine", "constant"))
    warmup_steps: int = num_field(10, ge=0)
    min_lr_ratio: float = num_field(0.1, ge=0, le=1)
    # Number of optimiser steps in this stage.
    max_steps: int = num_field(100, ge=1)
    # Sequences per forward pass, per rank.
    micro_batch_size: int = num_field(4, ge=1)
    # Micro-batches accumulated per optimiser step.
    grad_accum_steps: int = num_field(1, ge=1)
    # Max global gradient norm; 0 disables clipping.
    grad_clip: float = num_field(1.0, ge=0)
    # End this run at this step with a checkpoint, although the schedules span max_steps (for time-boxed jobs;
    # the next run resumes from it). null = run to max_steps.
    stop_at_step: Optional[int] = num_field(None, ge=1)
    # A step whose loss or gradient norm is not finite (on any rank) is skipped: no update, optimiser state
    # untouched, the LR schedule still advances. This many skipped steps in a row end the run with an error.
    max_bad_steps: int = num_field(5, ge=1)

    def validate(self):
        super().validate()
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise SkipGPTError(f"optim.betas={list(self.betas)} is out of range: use two numbers in [0, 1), "
                               "e.g. [0.9, 0.95]")
        for key in ("lr", "eps", "weight_decay"):  # the optimiser computes in fp32: 1e39 would overflow to inf
            value = getattr(self, key)
            if abs(value) > FP32_MAX:
                raise SkipGPTError(f"optim.{key}={value!r} overflows fp32 (max {FP32_MAX:.4g}): use a far smaller "
                                   "value, e.g. optim.lr=1e-3")
        return self


@dataclass
class LoraConfig(Section):
    _prefix: ClassVar[str] = "stage.lora"
    # LoRA rank.
    r: int = num_field(16, ge=1)
    # LoRA scaling numerator (scale = alpha / r).
    alpha: int = num_field(32, ge=1)
    dropout: float = num_field(0.1, ge=0, lt=1)
    # Linear submodules (by name) of each decoder layer that get adapters.
    target_modules: list[str] = list_field("q_proj", "v_proj", "gate_proj", nonempty=True)


@dataclass
class CalibrateConfig(Section):
    _prefix: ClassVar[str] = "stage.calibrate"
    # Stage 2, fresh runs: before LoRA trains, shift the loaded stage-1 routers' biases so that deterministic gates
    # skip as training did (routing/calibrate.py; what tools/calibrate_routers.py does), on every rank.
    enabled: bool = False
    # Overall target skip rate; null = the routers' own target(s).
    sparsity: Optional[float] = num_field(None, ge=0, lt=1)
    # Routers to move: both, or one kind only (it meets the overall target, the other stays as trained).
    kinds: str = choice_field("both", ("both", "attn", "mlp"))
    # per_layer: each layer keeps its trained skip rate, rescaled to the target; global: one threshold per group.
    method: str = choice_field("per_layer", ("per_layer", "global"))
    # Calibration sequences, the next ones of the training stream (its position is left unchanged).
    sequences: int = num_field(16, ge=1)


@dataclass
class StageConfig(Section):
    _prefix: ClassVar[str] = "stage"
    # 1 = router tuning (base frozen), 2 = LoRA restore (routers frozen and hard).
    stage: int = choice_field(1, (1, 2))
    # Stage 2: the stage-1 checkpoint folder, or a stage-1 run folder (its latest checkpoint is used).
    init_from: Optional[str] = None
    # Stage 2: keep training the routers alongside LoRA.
    train_routers: bool = False
    # Stage 2 with train_routers: sample Gumbel gates (at routers.temperature_end) as stage 1 does, or (false) train
    # through the deterministic decisions that evaluation and serving use, so LoRA adapts to exactly those.
    router_noise: bool = False
    # What the model learns from: `lm`, next-token cross entropy on the data; `distill`, the KL divergence from
    # the dense model (the same frozen weights with every sublayer executed, adapters off) on every position: a
    # full distribution per token instead of one label, at the cost of one extra no-grad forward per micro-batch.
    objective: str = choice_field("lm", ("lm", "distill"))
    lora: LoraConfig = section_field(LoraConfig)
    calibrate: CalibrateConfig = section_field(CalibrateConfig)

    def validate(self):
        super().validate()
        if self.stage == 2 and not self.init_from:
            raise SkipGPTError("stage.init_from is required for stage 2: set it to the stage-1 run folder or "
                               "checkpoint, e.g. stage.init_from=runs/smollm2_stage1")
        if self.stage == 1 and self.calibrate.enabled:
            raise SkipGPTError("stage.calibrate.enabled=true calibrates loaded stage-1 routers at the start of stage "
                               "2: set stage.stage=2, or calibrate a stage-1 run with tools/calibrate_routers.py")
        return self


@dataclass
class CheckpointConfig(Section):
    _prefix: ClassVar[str] = "checkpoint"
    # Save every N optimiser steps; 0 = only at the end.
    every_steps: int = num_field(50, ge=0)
    # Number of complete checkpoints kept in run_dir/checkpoints.
    keep_last: int = num_field(2, ge=1)
    # `auto`: resume from the newest complete checkpoint of run_dir if any; `never`; or a checkpoint folder path.
    resume: str = "auto"

    def validate(self):
        super().validate()
        if not self.resume.strip():
            raise SkipGPTError("checkpoint.resume is empty: use auto, never, or a checkpoint folder path")
        return self


@dataclass
class LoggingConfig(Section):
    _prefix: ClassVar[str] = "logging"
    # Log metrics every N optimiser steps.
    every_steps: int = num_field(1, ge=1)
    # Show a progress bar on rank 0.
    progress: bool = True
    # Also log to Weights & Biases (rank 0).
    wandb: bool = False
    wandb_project: str = "skipgpt-dist"
    # W&B mode; the WANDB_MODE environment variable, if set, wins over this key.
    wandb_mode: str = choice_field("offline", ("online", "offline", "disabled"))


@dataclass
class EvalConfig(Section):
    _prefix: ClassVar[str] = "eval"
    # Evaluate every N optimiser steps; 0 = only at the end.
    every_steps: int = num_field(0, ge=0)
    # Evaluate once more after the last step.
    at_end: bool = True


@dataclass
class ParallelConfig(Section):
    _prefix: ClassVar[str] = "parallel"
    # `none`: a single process; `deepspeed`: ZeRO; `fsdp2`: `fully_shard` per decoder block.
    backend: str = choice_field("none", ("none", "deepspeed", "fsdp2"))
    # Path to a DeepSpeed JSON config (backend=deepspeed); null -> the built-in default.
    ds_config: Optional[str] = None
    # Recompute each decoder block in the backward pass to save activation memory.
    activation_checkpointing: bool = False
    # `bf16`: compute in bfloat16 with fp32 master weights.
    mixed_precision: str = choice_field("none", ("none", "bf16"))
    # torch.compile each routed decoder block (training/compile.py): training and static-slot inference.
    # backend none or fsdp2 (ZeRO-3 gathers parameters in per-module hooks, inside the compiled region).
    compile: bool = False

    def validate(self):
        super().validate()
        if self.compile and self.backend == "deepspeed":
            raise SkipGPTError("parallel.compile=true is not supported with parallel.backend=deepspeed (ZeRO-3 "
                               "gathers parameters in hooks inside the compiled blocks): use parallel.backend=fsdp2 "
                               "or parallel.compile=false")
        return self


@dataclass
class TrainConfig(Section):
    _prefix: ClassVar[str] = ""
    # Folder for checkpoints, logs and the resolved config.
    run_dir: str = "runs/default"
    # Seed of model init (routers, LoRA), gate noise and (unless data.shuffle_seed) the data order.
    seed: int = num_field(0, ge=0)
    model: ModelConfig = section_field(ModelConfig)
    routers: RouterConfig = section_field(RouterConfig)
    data: DataConfig = section_field(DataConfig)
    optim: OptimConfig = section_field(OptimConfig)
    stage: StageConfig = section_field(StageConfig)
    checkpoint: CheckpointConfig = section_field(CheckpointConfig)
    logging: LoggingConfig = section_field(LoggingConfig)
    eval: EvalConfig = section_field(EvalConfig)
    parallel: ParallelConfig = section_field(ParallelConfig)

    def validate(self):
        super().validate()
        for f in dataclasses.fields(self):  # re-check sections, which may have been edited after construction
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        return self

    def global_batch_size(self, world_size: int) -> int:
        """Sequences per optimiser step over all ranks."""
        return self.optim.micro_batch_size * self.optim.grad_accum_steps * world_size


def check_run_dir(run_dir: str) -> None:
    """A training run's folder must be a directory it can write (or creatable in a writable one). Checked before
    the model loads and before anything is written; not part of validate(), since a checkpoint's saved config is
    also loaded read-only (tools) where its run_dir need not exist."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise SkipGPTError(f"run_dir={run_dir} is a file, not a folder: give a folder path (it is created if "
                           "missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SkipGPTError(f"run_dir={run_dir} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (its nearest existing parent {existing} is not)"
        raise SkipGPTError(f"run_dir={run_dir} is not writable{where}: choose a folder this user can write, or fix "
                           "its permissions (or a read-only mount)")


# ---------------------------------------------------------------- YAML, overrides, save


def _read_yaml(path: str) -> dict:
    text = read_user_file(path, f"config file {path} not found: check the path (example configs are in configs/)",
                          f"cannot read config file {path} ({{reason}}): pass a readable YAML file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise SkipGPTError(f"malformed YAML in {path}{line}: {problem}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SkipGPTError(f"config file {path} must hold a mapping of sections (e.g. `optim: {{lr: 1e-3}}`), "
                           f"not a {type(data).__name__}")
    return data


def _apply_override(data: dict, override: str) -> None:
    """Apply one `key.sub=value` override to the nested dict `data` (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SkipGPTError(f"override {override!r} has no '=': write it as key.sub=value, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise SkipGPTError(f"override {override!r}: the value is not valid YAML; quote it, "
                           f"e.g. {key}='{raw}'") from None
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SkipGPTError(f"override {override!r}: {'.'.join(parents[:i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), for_training: bool = False) -> TrainConfig:
    """Defaults <- YAML file at `path` (if given) <- `key.sub=value` overrides; validated. for_training: the config
    starts a run (train.py, the Slurm preflight), so a model of one's own must name its training text."""
    data = _read_yaml(os.fspath(path)) if path is not None else {}
    for override in overrides:
        _apply_override(data, override)
    cfg = section_from_dict(TrainConfig, data, "")
    if for_training:
        check_training_data_named(cfg, data)
    return cfg


def _builtin_model(path: str) -> bool:
    """A builtin name, or the folder a builtin name resolves to (the asset cache's models/)."""
    from .assets import cache_dir

    if path.startswith("builtin:"):
        return True
    models = Path(cache_dir()) / "models"
    return Path(os.path.abspath(os.path.expanduser(path))).parent == models


def check_training_data_named(cfg: TrainConfig, data: dict) -> None:
    """The builtin plays are the default training text of the builtin models only: a model of one's own (a 70B
    checkpoint on a cluster) must name its corpus, or it would silently be tuned on 4.7 MB of Shakespeare."""
    named = isinstance(data.get("data"), dict) and "train_files" in data["data"]
    if not named and not _builtin_model(str(cfg.model.path)):
        raise SkipGPTError(f"model.path={cfg.model.path} needs its training text: set data.train_files (and "
                           "data.eval_files), e.g. data.train_files=[/data/corpus/*.jsonl] or a token-shard folder "
                           "from tools/prepare_data.py; the builtin plays are only the builtin models' default")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg) -> dict:
    """The fully resolved config as plain dicts / lists / scalars (YAML- and JSON-safe)."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg, path) -> None:
    """Write the fully resolved config as YAML (atomically: temp file, then rename)."""
    path = Path(path)
    data = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False, default_flow_style=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
