"""The few collective helpers the loop needs; every one is a no-op in a single process.

Every collective of the loop, the evaluation and the losses goes through all_reduce_sum, which runs it on
comm_device(): NCCL moves only CUDA tensors (a CPU tensor raises "No backend type associated with device type
cpu"), so the device of a collective is decided here, once, from the default group's backends.
"""
from __future__ import annotations

import atexit
import contextlib
import os

import torch
import torch.distributed as dist

from ..errors import SkipGPTError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def backend_string(cuda: bool | None = None) -> str:
    """The backend(s) the engines start the default group with. On GPUs NCCL serves CUDA tensors and gloo stays
    bound to CPU, so CPU tensors (object collectives, anything built on the host) can still be reduced."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def local_device() -> torch.device:
    """This rank's compute device: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def group_backends(config: str | None = None) -> dict[str, str]:
    """Device type -> backend of the default group, from its config ("cpu:gloo,cuda:nccl"; "gloo" alone serves
    both device types)."""
    config = dist.get_backend_config() if config is None else config
    pairs = [item.split(":", 1) for item in config.split(",") if item]
    if len(pairs) == 1 and len(pairs[0]) == 1:
        return {"cpu": pairs[0][0], "cuda": pairs[0][0]}
    return {device.strip(): backend.strip() for device, backend in pairs}


def comm_device(backends: dict[str, str] | None = None) -> torch.device:
    """Where a collective's tensor must live: the current CUDA device when the group moves CUDA tensors with NCCL
    (or has no CPU backend at all), else the CPU."""
    if backends is None:
        if not is_distributed():
            return torch.device("cpu")
        backends = group_backends()
    cuda = torch.cuda.is_available()
    if cuda and "cuda" in backends and (backends["cuda"] == "nccl" or "cpu" not in backends):
        return torch.device("cuda", torch.cuda.current_device())
    if "cpu" in backends:
        return torch.device("cpu")
    shown = ",".join(f"{d}:{b}" for d, b in backends.items())
    raise SkipGPTError(f"the process group ({shown}) has no backend for CPU tensors and CUDA is unavailable: start "
                       f"it with init_process_group(\"{backend_string()}\")")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a (detached) tensor over ranks; returns a new tensor on values' device. The collective itself runs on
    comm_device() (a CPU tensor visits the GPU under NCCL; a GPU tensor stays put)."""
    if not is_distributed():
        return values.detach().clone()
    buffer = values.detach().to(comm_device(), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(values.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_rank_first():
    """Rank 0 runs the block first, then the other ranks (e.g. tokenising text: `datasets` caches it once and the
    others read the cache). One process: just the block."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def join_tool_ranks(device: torch.device) -> None:
    """A tool under torchrun (WORLD_SIZE > 1) joins the process group: gloo for CPU tensors, plus NCCL for CUDA
    ones when it runs on a GPU (collectives go through all_reduce_sum on the right device). One process, or a group
    already joined: nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_string(device.type == "cuda"))
    atexit.register(dist.destroy_process_group)
