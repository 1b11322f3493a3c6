"""The checkpoint's LoRA pairs, from adapter/ (peft's format) or from the engine's own files, and the merge of one
base weight: W' = W + s * B @ A in fp32, cast back to the base dtype, s = lora_alpha / r (lora_alpha / sqrt(r)
with rsLoRA), as peft merges it."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..errors import SkipGPTError
from ..file_names import ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_WEIGHTS_FILE
from .checkpoint_reader import Checkpoint, engine_trainable_state

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?:.*?base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?"
                       r"\.weight$")


@dataclass
class LoraPair:
    module: str  # module path in the HF model, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    fan_in_fan_out: bool = False

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """weight + s * B @ A, computed in fp32 (in place on the fp32 copy: no full-size temporaries) and cast back
        to the weight's dtype."""
        merged = weight.float()  # the weight itself when it is already fp32 (a fresh tensor read from the shard)
        target = merged.T if self.fan_in_fan_out else merged
        target.addmm_(self.b.float(), self.a.float(), alpha=self.scale)
        return merged.to(weight.dtype)


@dataclass
class Lora:
    pairs: dict[str, LoraPair]  # keyed by the base weight's safetensors key
    source: str  # where the weights came from (named in messages and in config.json)
    r: int
    alpha: float
    target_modules: list[str]
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA tensors under the training model's names

    @property
    def nbytes(self) -> int:
        return sum(p.a.nbytes + p.b.nbytes for p in self.pairs.values())


def read_lora(ckpt: Checkpoint, prefer: str = "adapter") -> Lora:
    """The checkpoint's LoRA pairs: from adapter/ (peft format) or, prefer="engine" / no adapter, from the
    engine's own files. A checkpoint without LoRA weights is an error that names the fix."""
    order = ("adapter", "engine") if prefer == "adapter" else ("engine", "adapter")
    for source in order:
        lora = _lora_from_adapter(ckpt) if source == "adapter" else _lora_from_engine(ckpt)
        if lora is not None:
            return lora
    stage = "a stage-1 (router) checkpoint" if ckpt.stage == 1 else "a checkpoint without LoRA weights"
    raise SkipGPTError(f"checkpoint {ckpt.path} has no LoRA weights (no {ADAPTER_DIR}/ and no lora_ tensors in its "
                       f"{ckpt.backend_name} engine files): it is {stage}; merge a stage-2 checkpoint (train.py with "
                       "stage.stage=2), or load the stage-1 checkpoint itself with load_routed_model(CHECKPOINT)")


def _lora_from_adapter(ckpt: Checkpoint) -> Optional[Lora]:
    folder = ckpt.path / ADAPTER_DIR
    cfg_file, weights = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    if not folder.is_dir():
        return None
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
        with safe_open(str(weights), framework="pt") as f:
            named = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise SkipGPTError(f"{folder} is not a readable peft adapter ({type(err).__name__}: {err}): the checkpoint "
                           "is damaged; delete adapter/ to use the engine's files, or use another checkpoint") from None
    _check_peft_config(config, folder)
    return _pair(named, config, source=f"{ADAPTER_DIR}/", ckpt=ckpt)


def _check_peft_config(config: dict, folder: Path) -> None:
    problems = [(config.get("peft_type", "LORA") != "LORA", f"peft_type={config.get('peft_type')}"),
                (bool(config.get("use_dora")), "use_dora=true"),
                (config.get("lora_bias") not in (None, False), "lora_bias=true"),
                (bool(config.get("modules_to_save")), f"modules_to_save={config.get('modules_to_save')}"),
                (bool(config.get("target_parameters")), "target_parameters")]
    for bad, what in problems:
        if bad:
            raise SkipGPTError(f"adapter {folder} uses {what}, which merge_lora does not fold: train plain LoRA "
                               "(skipgpt-dist's stage 2) or merge it with peft's merge_and_unload")


def _lora_from_engine(ckpt: Checkpoint) -> Optional[Lora]:
    named = {k: v for k, v in engine_trainable_state(ckpt).items() if ".lora_" in k}
    if not named:
        return None
    lora_cfg = ckpt.cfg.stage.lora
    config = {"r": lora_cfg.r, "lora_alpha": lora_cfg.alpha, "target_modules": list(lora_cfg.target_modules)}
    return _pair(named, config, source=f"{ckpt.backend_name} engine files", ckpt=ckpt)


def _pair(named: dict[str, torch.Tensor], config: dict, source: str, ckpt: Checkpoint) -> Lora:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    raw = {}
    for key, tensor in named.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise SkipGPTError(f"{source} of {ckpt.path} holds {key}, which is not a LoRA A/B weight (embedding LoRA, "
                               "DoRA and biases are not supported): merge plain LoRA on linear layers")
        if match["name"] not in (None, "default"):
            raise SkipGPTError(f"{source} of {ckpt.path} holds adapter {match['name']!r}; only one adapter (default) "
                               "is supported")
        halves.setdefault(match["module"], {})[match["ab"]] = tensor
        raw[f"{PEFT_PREFIX}{match['module']}.lora_{match['ab']}.default.weight"] = tensor
    pairs = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
            raise SkipGPTError(f"{source} of {ckpt.path}: the LoRA pair of {module} is incomplete or inconsistent "
                               f"({ {k: tuple(v.shape) for k, v in ab.items()} }): the checkpoint is damaged")
        rank = ab["A"].shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        pairs[f"{module}.weight"] = LoraPair(module, ab["A"], ab["B"], scale, bool(config.get("fan_in_fan_out")))
    targets = config.get("target_modules") or []
    return Lora(pairs=pairs, source=source, r=int(config.get("r", 0)), alpha=float(config.get("lora_alpha", 0)),
                target_modules=sorted(targets) if isinstance(targets, list) else [targets], raw=raw)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha pattern lookup: the first key matching the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
