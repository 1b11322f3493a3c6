"""Every random number generator a training rank draws from (torch CPU/CUDA, python `random`, numpy), captured
and restored, and saved into a checkpoint as `rng_rank{r}.safetensors` + `rng_rank{r}.json` (no pickles)."""
from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from .durable import write_json


def capture_rng_state() -> dict:
    """{"tensors": torch generator states (uint8), "json": python random + numpy states as JSON}."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:
        return {"tensors": tensors, "json": state}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return {"tensors": tensors, "json": state}


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state. CUDA states are restored only when the device count matches."""
    tensors, js = state["tensors"], state["json"]
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                       key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in js:
        import numpy as np

        name, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_rng(folder: Path, rank: int) -> None:
    state = capture_rng_state()
    save_file({k: v.contiguous() for k, v in state["tensors"].items()}, str(folder / f"rng_rank{rank}.safetensors"))
    write_json(folder / f"rng_rank{rank}.json", state["json"])
