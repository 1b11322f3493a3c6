"""A streaming safetensors writer: the header first (from the tensors' specs), then each tensor's bytes as it is
produced, so a file of any size is written with about one tensor in memory. Files load with safetensors itself."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import SkipGPTError

# safetensors dtype codes <-> torch dtypes (the ones a causal LM checkpoint holds).
_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_CODE_OF = {v: k for k, v in _CODES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                      metadata: Optional[dict] = None) -> int:
    """Write a safetensors file tensor by tensor: the header (from `specs`) first, then `produce(spec)` for each
    spec in order, each written and dropped before the next is made. Returns the bytes of tensor data."""
    header, offset = {}, 0
    for spec in specs:
        header[spec.name] = {"dtype": _CODE_OF[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for spec in specs:
            tensor = produce(spec)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
                raise RuntimeError(f"{spec.name}: produced {tensor.dtype} {tuple(tensor.shape)}, header says "
                                   f"{spec.dtype} {spec.shape}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                fh.write(memoryview(data.view(torch.uint8).numpy()))
            del tensor, data
        fh.flush()
        os.fsync(fh.fileno())
    return offset


def spec_of(handle, key: str) -> TensorSpec:
    sl = handle.get_slice(key)
    code = sl.get_dtype()
    if code not in _CODES:
        raise SkipGPTError(f"tensor {key} has dtype {code}, which skipgpt-dist cannot export: use a model saved in "
                           "float32, bfloat16 or float16")
    return TensorSpec(key, _CODES[code], tuple(sl.get_shape()))


def write_or_explain(path: Path, specs, produce, metadata) -> int:
    try:
        return write_safetensors(path, specs, produce, metadata=metadata)
    except OSError as err:
        raise SkipGPTError(f"cannot write {path} ({err.strerror or err}): check the free space and permissions of "
                           f"{path.parent.parent}") from None
