"""Parameters that a family's safetensors files hold under another layout than the model's own names.

transformers 5 builds some families with fused tensors but saves them (save_pretrained, and the published
checkpoints) in their historical layout, converting on load (transformers.conversion_mapping). Mixtral is one: the
model has `mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I) and `mlp.gate`, the files hold
`block_sparse_moe.experts.{e}.w1/w3/w2.weight` and `block_sparse_moe.gate.weight`. The FSDP2 loader reads each
rank's rows by the model's names; for these parameters it asks here which file tensors make the rows it holds, and
reads only those (FSDP2 shards dim 0, the experts: a rank reads its own experts' matrices, nothing else).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch

# read(key, box) -> the rows/columns `box` (a tuple of slices) of file tensor `key`
Read = Callable[[str, tuple], torch.Tensor]
# builder(read, box) -> the box of the model's parameter
Builder = Callable[[Read, tuple], torch.Tensor]

_MIXTRAL = re.compile(r"(?P<layer>.*\.layers\.\d+)\.mlp\.(?P<part>gate\.weight|experts\.gate_up_proj|experts\.down_proj)")


def _mixtral(name: str) -> Optional[Builder]:
    match = _MIXTRAL.fullmatch(name)
    if match is None:
        return None
    moe, part = f"{match['layer']}.block_sparse_moe", match["part"]
    if part == "gate.weight":
        return lambda read, box: read(f"{moe}.gate.weight", box)

    def experts(read: Read, box: tuple) -> torch.Tensor:
        first, rows, cols = box
        if first.stop <= first.start:  # a rank whose shard holds no expert
            return torch.empty(tuple(s.stop - s.start for s in box))
        per_expert = []
        for e in range(first.start, first.stop):
            prefix = f"{moe}.experts.{e}"
            if part == "experts.down_proj":  # (H, I) = w2
                per_expert.append(read(f"{prefix}.w2.weight", (rows, cols)))
            else:  # (2I, H) = [w1; w3]: gate rows first, as HF's Concatenate(dim=1) of the stacked experts
                gate_up = torch.cat([read(f"{prefix}.w1.weight", (slice(None), cols)),
                                     read(f"{prefix}.w3.weight", (slice(None), cols))])
                per_expert.append(gate_up[rows])
        return torch.stack(per_expert)

    return experts


LAYOUTS: dict[str, Callable[[str], Optional[Builder]]] = {"mixtral": _mixtral}


def legacy_builder(model_type: Optional[str], name: str) -> Optional[Builder]:
    """How to build parameter `name` of a `model_type` model from its files' historical layout, or None."""
    layout = LAYOUTS.get(model_type or "")
    return layout(name) if layout is not None else None
