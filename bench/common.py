"""Small timing helpers shared by the benchmarks (CPU wall clock; a CUDA sync when tensors live on a GPU)."""
from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Callable, Sequence

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


def round_robin(names: Sequence[str], repeats: int, measure: Callable[[str], dict[str, float]],
                rotate: bool = True) -> dict[str, dict[str, list[float]]]:
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
        print(f"[bench] repeat {rep + 1}/{repeats} done", file=sys.stderr, flush=True)
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
