"""A DCP (torch.distributed.checkpoint) folder -> its model tensors, read in this process without a process group
(whatever number of ranks wrote it)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SkipGPTError


def read_dcp_state(folder: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, read in this process (no process group; any number of writers)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        reader = dcp.FileSystemReader(str(folder))
        meta = reader.read_metadata()
        state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
                 if isinstance(m, TensorStorageMetadata) and k.startswith("model.")}
        if state:
            dcp.load(state, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise SkipGPTError(f"the DCP files in {folder} cannot be read ({first}): the checkpoint is damaged or "
                           "incomplete; use another checkpoint") from None
    return {k[len("model."):]: v for k, v in state.items()}
