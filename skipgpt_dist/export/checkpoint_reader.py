"""A training checkpoint as the tools read it: its resolved config and trainer state, its routers, and the trained
tensors held by the engine's own files (for when the portable artifacts are missing).

The engine files hold pickles (DCP `.metadata`, DeepSpeed `*_states.pt`): each is checked against the size and
sha256 that trainer_state.json recorded (`verify_engine_files`) before `zero_reader` / `dcp_reader` read it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import SkipGPTError
from ..file_names import CONFIG_FILE, DCP_DIR, DEEPSPEED_DIR, ROUTERS_FILE, TRAINABLE_FILE
from .dcp_reader import read_dcp_state
from .zero_reader import read_deepspeed_state


@dataclass
class Checkpoint:
    path: Path
    cfg: object  # skipgpt_dist.config.TrainConfig
    state: dict

    @property
    def backend(self) -> str:
        if (self.path / DEEPSPEED_DIR).is_dir():
            return "deepspeed"
        if (self.path / DCP_DIR).is_dir():
            return "fsdp2"
        return self.state.get("backend", "none")

    @property
    def backend_name(self) -> str:
        return {"none": "one-process", "deepspeed": "DeepSpeed", "fsdp2": "FSDP2 (DCP)"}.get(self.backend,
                                                                                              self.backend)

    @property
    def stage(self) -> int:
        return int(self.state.get("stage") or self.cfg.stage.stage)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A complete training checkpoint (or the latest one of a run folder) and its resolved config."""
    from ..checkpoint import CheckpointManager, find_checkpoint
    from ..config import load_config

    folder = find_checkpoint(path, key="checkpoint")
    if not (folder / CONFIG_FILE).is_file():
        raise SkipGPTError(f"checkpoint {folder} has no {CONFIG_FILE}: it was not written by skipgpt-dist train.py")
    return Checkpoint(path=folder, cfg=load_config(str(folder / CONFIG_FILE)),
                      state=CheckpointManager.load_trainer_state(folder))


def read_routers(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors keyed layers.{i}.{attn|mlp}_router.{param}, metadata) of the checkpoint's routers.safetensors."""
    path = ckpt.path / ROUTERS_FILE
    if not path.is_file():
        raise SkipGPTError(f"checkpoint {ckpt.path} has no {ROUTERS_FILE}: it was not written by skipgpt-dist "
                           "train.py (every checkpoint holds one)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise SkipGPTError(f"{path} is not a readable safetensors file ({err}): the checkpoint is damaged; use "
                           "another checkpoint") from None
    if "skipgpt_router_config" not in meta:
        raise SkipGPTError(f"{path} has no skipgpt_router_config metadata: it was not written by save_routers")
    return tensors, meta


def verify_engine_files(ckpt: Checkpoint, sub: str) -> None:
    """The engine's own files (DCP `.metadata`, DeepSpeed `*_states.pt` are pickles) must match the sizes and sha256
    that trainer_state.json records before anything reads them: a damaged or replaced file is never unpickled."""
    from ..checkpoint import verify_checkpoint

    problem = verify_checkpoint(ckpt.path, under=sub)
    if problem is not None:
        raise SkipGPTError(f"checkpoint {ckpt.path}: its {sub}/ files do not verify against trainer_state.json "
                           f"({problem}); they are not read (they hold pickles): use another checkpoint")


def engine_trainable_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The trained tensors held by the engine's own files, named as in the training model (peft names in stage 2;
    no wrapper prefixes). Empty if the engine stored none. DCP / DeepSpeed files are verified first."""
    backend = ckpt.backend
    if backend == "deepspeed":
        verify_engine_files(ckpt, DEEPSPEED_DIR)
        return read_deepspeed_state(ckpt.path / DEEPSPEED_DIR)
    if backend == "fsdp2":
        verify_engine_files(ckpt, DCP_DIR)
        return read_dcp_state(ckpt.path / DCP_DIR)
    path = ckpt.path / TRAINABLE_FILE
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise SkipGPTError(f"{path} is unreadable or truncated ({err}): the checkpoint is damaged; use another "
                           "checkpoint") from None
