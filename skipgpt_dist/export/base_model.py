"""The base model: a Hugging Face model folder's config and shard headers (checked against its index), and a
reader that keeps only the shard in use open, so a merge reads the model one shard at a time."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import SkipGPTError
from ..file_names import INDEX_FILE, SINGLE_FILE
from .safetensors_writer import TensorSpec, spec_of


@dataclass
class BaseModel:
    """A Hugging Face model folder: its config and the tensors of each safetensors shard (headers only)."""

    folder: Path
    config: dict
    shards: dict[str, list[TensorSpec]]  # shard file name -> tensors, in file order
    indexed: bool

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return {s.name: s for specs in self.shards.values() for s in specs}


def open_base_model(folder: str | Path) -> BaseModel:
    """Read config.json and every shard header; a missing, truncated or inconsistent shard is an error."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SkipGPTError(f"base model {folder} has no readable config.json ({type(err).__name__}): give a folder "
                           "saved with save_pretrained") from None
    index, indexed = folder / INDEX_FILE, False
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SkipGPTError(f"base model {folder}: {INDEX_FILE} is not a valid index ({type(err).__name__}): "
                               "re-save the base model with save_pretrained") from None
        names, indexed = sorted(set(weight_map.values())), True
    elif (folder / SINGLE_FILE).is_file():
        names, weight_map = [SINGLE_FILE], None
    else:
        raise SkipGPTError(f"base model {folder} has no {SINGLE_FILE} or {INDEX_FILE}: re-save it with "
                           "save_pretrained(safe_serialization=True)")
    shards = {name: _read_shard_header(folder, name) for name in names}
    if weight_map is not None:
        _check_index(folder, weight_map, shards)
    return BaseModel(folder=folder, config=config, shards=shards, indexed=indexed)


def _read_shard_header(folder: Path, name: str) -> list[TensorSpec]:
    path = folder / name
    if not path.is_file():
        raise SkipGPTError(f"base model {folder}: shard {name} is missing: re-download or re-save the base model "
                           "(every file its index lists must be present)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return [spec_of(f, key) for key in f.keys()]
    except SkipGPTError:
        raise
    except Exception as err:  # safetensors raises its own error type for a bad or truncated file
        raise SkipGPTError(f"base model {folder}: shard {name} is unreadable or truncated ({err}): re-download or "
                           "re-save the base model") from None


def _check_index(folder: Path, weight_map: dict, shards: dict[str, list[TensorSpec]]) -> None:
    held = {spec.name: shard for shard, specs in shards.items() for spec in specs}
    for key, shard in weight_map.items():
        if held.get(key) != shard:
            raise SkipGPTError(f"base model {folder}: {INDEX_FILE} puts {key} in {shard}, but that shard does not "
                               "hold it: the files are from different saves; re-download or re-save the base model")


class ShardReader:
    """Reads tensors from a model folder's shards, keeping only the shard in use open (mapped)."""

    def __init__(self, folder: Path):
        self.folder, self.name, self.handle, self._stack = folder, None, None, contextlib.ExitStack()

    def get(self, shard: str, key: str) -> torch.Tensor:
        try:
            if shard != self.name:
                self.close()
                self._stack = contextlib.ExitStack()
                self.handle = self._stack.enter_context(safe_open(str(self.folder / shard), framework="pt"))
                self.name = shard
            return self.handle.get_tensor(key)
        except Exception as err:  # the shard changed or broke after its header was read
            raise SkipGPTError(f"base model {self.folder}: shard {shard} could not be read ({err}): re-download or "
                               "re-save the base model") from None

    def close(self) -> None:
        self._stack.close()
        self.name, self.handle = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
