"""DeepSpeed's ZeRO partitions -> full fp32 tensors, in this process, with DeepSpeed's own zero_to_fp32 under a
weights-only torch.load (the files are pickles: nothing but tensors and DeepSpeed's allow-listed classes load)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ..errors import SkipGPTError


def _deepspeed_allowlist() -> list:
    """DeepSpeed classes pickled into its checkpoint files; loaded with weights_only=True only these are allowed."""
    allowed = []
    for module, names in (("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler"))):
        with contextlib.suppress(ImportError):
            mod = __import__(module, fromlist=list(names))
            allowed += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return allowed


@contextlib.contextmanager
def _weights_only_torch_load():
    """DeepSpeed's zero_to_fp32 calls torch.load(weights_only=False); force weights_only=True (no arbitrary code
    from a checkpoint) with DeepSpeed's own enum/scaler classes allow-listed."""
    original = torch.load
    allowed = _deepspeed_allowlist()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def read_deepspeed_state(folder: Path) -> dict[str, torch.Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise SkipGPTError(f"checkpoint {folder.parent} was written by DeepSpeed, which is not importable ({err}): "
                           "pip install deepspeed to read it") from None
    tag_file = folder / "latest"
    tag = tag_file.read_text().strip() if tag_file.is_file() else None
    try:
        with _weights_only_torch_load(), contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag, exclude_frozen_parameters=True)
    except Exception as err:  # DeepSpeed raises ValueError/FileNotFoundError/pickle errors for damaged folders
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise SkipGPTError(f"the DeepSpeed files in {folder} cannot be read ({first}): the checkpoint is damaged or "
                           "incomplete; use another checkpoint") from None
    return {k: v.detach().cpu() for k, v in state.items()}
