"""Export trained SkipGPT checkpoints: merge LoRA into the base weights (tools/merge_lora.py) and consolidate
sharded checkpoints into one safetensors file (tools/consolidate.py).

Every checkpoint, whatever the back end, holds the portable artifacts `routers.safetensors` and (stage 2)
`adapter/` in peft's format, so tools read those first. Without them the trained tensors come from the engine's own
files: `trainable.safetensors` (one process), DeepSpeed's ZeRO partitions (`deepspeed/`, rebuilt with DeepSpeed's
zero_to_fp32 under a weights-only torch.load), or a DCP folder (`dcp/`, read without a process group). Those engine
files hold pickles (DCP `.metadata`, DeepSpeed `*_states.pt`): before anything reads them, each is checked against the
size and sha256 that the checkpoint's trainer_state.json recorded when it was written (`verify_engine_files`), so a
damaged, replaced or added file is a one-line error and is never unpickled.

Merging streams: the base model's safetensors shards are read one at a time (`safe_open`) and each output shard is
written tensor by tensor (header first, then the bytes; see `write_safetensors`), so peak memory is about one shard
(the mapped input pages) plus the adapters, never the whole model. W' = W + s * B @ A is computed in fp32 and cast
back to the base dtype, s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), as peft merges it.

Outputs appear atomically: everything is written into a temp folder (or file) beside the target, flushed, then
renamed into place; a replaced target (`force`) is moved aside first and restored if the rename fails.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import safe_open

from .checkpoint import ROUTERS_FILE, _fsync_dir, _fsync_tree  # noqa: F401  (shared flush helpers)
from .errors import SkipGPTError

ADAPTER_DIR = "adapter"
TRAINABLE_FILE = "trainable.safetensors"
DEEPSPEED_DIR = "deepspeed"
DCP_DIR = "dcp"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXPORT_FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "spiece.model", "sentencepiece.bpe.model")
PEFT_PREFIX = "base_model.model."

# safetensors dtype codes <-> torch dtypes (the ones a causal LM checkpoint holds).
_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_CODE_OF = {v: k for k, v in _CODES.items()}
_LORA_KEY = re.compile(r"^(?:.*?base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?"
                       r"\.weight$")
_SAVED_ROUTER_KEY = re.compile(r"^layers\.(\d+)\.(attn|mlp)_router\.(.+)$")

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- streaming safetensors writer


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


def _spec_of(handle, key: str) -> TensorSpec:
    sl = handle.get_slice(key)
    code = sl.get_dtype()
    if code not in _CODES:
        raise SkipGPTError(f"tensor {key} has dtype {code}, which skipgpt-dist cannot export: use a model saved in "
                           "float32, bfloat16 or float16")
    return TensorSpec(key, _CODES[code], tuple(sl.get_shape()))


# ---------------------------------------------------------------- atomic outputs


def _check_new_path(out: Path, force: bool, flag: str) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise SkipGPTError(f"{flag} {out} already exists: pass --force to replace it, or choose a new path")


def _check_not_inside(out: Path, inputs: dict[str, Path], flag: str) -> None:
    """Refuse an output that would replace (or contain) an input being read."""
    target = out.resolve()
    for what, path in inputs.items():
        source = Path(path).resolve()
        if target == source or target in source.parents:
            raise SkipGPTError(f"{flag} {out} would replace the {what} it reads ({source}): choose another path")


def _check_replaceable_dir(out: Path, flag: str) -> None:
    """--force replaces an empty folder or a previous export (config.json with a `skipgpt` section), nothing else:
    a typo must not delete an unrelated tree."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SkipGPTError(f"{flag} {out} exists and is not a folder: remove it or choose another path")
    if not any(out.iterdir()):
        return
    try:
        exported = "skipgpt" in json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        exported = False
    if not exported:
        raise SkipGPTError(f"{flag} {out} exists and is not a folder written by merge_lora, so --force does not "
                           "replace it: remove it yourself or choose another path")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it is flushed and renamed to `out` (replacing it if `force`).
    On any error the temp folder is removed and `out` is untouched."""
    out = Path(out).absolute()
    _check_new_path(out, force, flag)
    _check_replaceable_dir(out, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: Path, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    out = Path(out).absolute()
    _check_new_path(out, force, flag)
    if out.is_dir():
        raise SkipGPTError(f"{flag} {out} is a folder: give a file name such as {out / 'model.safetensors'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)




# ---------------------------------------------------------------- the base model's shards


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
            return [_spec_of(f, key) for key in f.keys()]
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


# ---------------------------------------------------------------- the checkpoint: config, routers, LoRA


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
    from .checkpoint import CheckpointManager, find_checkpoint
    from .config import load_config

    folder = find_checkpoint(path, key="checkpoint")
    if not (folder / "config.yaml").is_file():
        raise SkipGPTError(f"checkpoint {folder} has no config.yaml: it was not written by skipgpt-dist train.py")
    return Checkpoint(path=folder, cfg=load_config(str(folder / "config.yaml")),
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
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
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


# ---------------------------------------------------------------- engine files (when the artifacts are missing)


def verify_engine_files(ckpt: Checkpoint, sub: str) -> None:
    """The engine's own files (DCP `.metadata`, DeepSpeed `*_states.pt` are pickles) must match the sizes and sha256
    that trainer_state.json records before anything reads them: a damaged or replaced file is never unpickled."""
    from .checkpoint import verify_checkpoint

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
        return _deepspeed_state(ckpt.path / DEEPSPEED_DIR)
    if backend == "fsdp2":
        verify_engine_files(ckpt, DCP_DIR)
        return _dcp_state(ckpt.path / DCP_DIR)
    path = ckpt.path / TRAINABLE_FILE
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise SkipGPTError(f"{path} is unreadable or truncated ({err}): the checkpoint is damaged; use another "
                           "checkpoint") from None


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


def _deepspeed_state(folder: Path) -> dict[str, torch.Tensor]:
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


def _dcp_state(folder: Path) -> dict[str, torch.Tensor]:
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


# ---------------------------------------------------------------- checks shared by the tools


def check_fits(base: BaseModel, lora: Optional[Lora], routers_meta: dict, ckpt: Checkpoint) -> None:
    """The adapter and the routers must have been trained on this base model."""
    fix = (f"pass the base model the checkpoint was trained on as --base (its config.yaml says "
           f"model.path={ckpt.cfg.model.path})")
    layers, hidden = base.config.get("num_hidden_layers"), base.config.get("hidden_size")
    if routers_meta.get("num_layers") != str(layers) or routers_meta.get("hidden_size") != str(hidden):
        raise SkipGPTError(f"the routers of {ckpt.path} are for {routers_meta.get('num_layers')} layers of hidden "
                           f"size {routers_meta.get('hidden_size')}, base model {base.folder} has {layers} x "
                           f"{hidden}: {fix}")
    if lora is None:
        return
    specs = base.specs
    for key, pair in lora.pairs.items():
        spec = specs.get(key)
        if spec is None:
            raise SkipGPTError(f"the adapter of {ckpt.path} ({lora.source}) adapts {key}, which base model "
                               f"{base.folder} does not store (another architecture, or a tied weight): {fix}")
        out_dim, in_dim = pair.b.shape[0], pair.a.shape[1]
        want = (in_dim, out_dim) if pair.fan_in_fan_out else (out_dim, in_dim)
        if tuple(spec.shape) != want:
            raise SkipGPTError(f"the adapter of {ckpt.path} does not fit base model {base.folder}: {key} is "
                               f"{tuple(spec.shape)} there but the LoRA update is {want}: {fix}")
        if not spec.dtype.is_floating_point:
            raise SkipGPTError(f"base weight {key} is {spec.dtype} (quantised?): merge into a float16/bfloat16/float32 "
                               "copy of the base model")


# ---------------------------------------------------------------- merge_lora


def merge_lora(checkpoint: str | Path, out: str | Path, base: Optional[str] = None, force: bool = False,
               log: Log = _log) -> Path:
    """Fold a stage-2 checkpoint's LoRA into the base weights and write a self-contained routed model folder:
    HF safetensors shards + index, routers.safetensors, config.json with a `skipgpt` section, generation config and
    tokenizer. Loads with load_routed_model (routed) or AutoModelForCausalLM.from_pretrained (dense)."""
    from .assets import resolve_model_path

    _check_new_path(Path(out).absolute(), force, "--out")  # cheap checks first
    _check_replaceable_dir(Path(out).absolute(), "--out")
    ckpt = open_checkpoint(checkpoint)
    _, routers_meta = read_routers(ckpt)
    lora = read_lora(ckpt, prefer="adapter")
    base_dir = Path(resolve_model_path(base if base is not None else ckpt.cfg.model.path))
    model = open_base_model(base_dir)
    check_fits(model, lora, routers_meta, ckpt)
    out = Path(out)
    _check_not_inside(out, {"base model": base_dir, "checkpoint": ckpt.path}, "--out")
    started = time.time()
    log(f"merging {len(lora.pairs)} LoRA pairs from {ckpt.path} ({lora.source}) into {base_dir} "
        f"({len(model.shards)} shard{'s' * (len(model.shards) > 1)})")
    with atomic_dir(out, force) as tmp:
        weight_map, total = _merge_shards(model, lora, tmp, log)
        _write_index(tmp, weight_map, total)
        shutil.copyfile(ckpt.path / ROUTERS_FILE, tmp / ROUTERS_FILE)
        _write_config(tmp, model, ckpt, routers_meta, lora)
        _write_generation_config(tmp, model)
        _copy_tokenizer(tmp, model.folder, ckpt, log)
    log(f"wrote {out} ({total / 2**20:.1f} MiB of weights) in {time.time() - started:.1f} s")
    return out


def _merge_shards(model: BaseModel, lora: Lora, tmp: Path, log: Log) -> tuple[dict[str, str], int]:
    weight_map, total, merged = {}, 0, 0
    for i, (name, specs) in enumerate(model.shards.items(), 1):
        t0, count = time.time(), 0
        with ShardReader(model.folder) as reader:
            def produce(spec: TensorSpec) -> torch.Tensor:
                nonlocal count
                tensor = reader.get(name, spec.name)
                pair = lora.pairs.get(spec.name)
                if pair is None:
                    return tensor
                count += 1
                return pair.merge(tensor)

            size = _write_or_explain(tmp / name, specs, produce, {"format": "pt"})
        total, merged = total + size, merged + count
        weight_map.update({spec.name: name for spec in specs})
        log(f"[merge_lora] shard {i}/{len(model.shards)} {name}: {len(specs)} tensors, {count} merged, "
            f"{size / 2**20:.1f} MiB, {time.time() - t0:.2f} s")
    if merged != len(lora.pairs):
        raise RuntimeError(f"merged {merged} LoRA pairs, expected {len(lora.pairs)}")
    return weight_map, total


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


def _write_or_explain(path: Path, specs, produce, metadata) -> int:
    try:
        return write_safetensors(path, specs, produce, metadata=metadata)
    except OSError as err:
        raise SkipGPTError(f"cannot write {path} ({err.strerror or err}): check the free space and permissions of "
                           f"{path.parent.parent}") from None


def _write_index(tmp: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def skipgpt_section(router_cfg: dict, ckpt: Checkpoint, lora: Optional[Lora], base_dir: Path) -> dict:
    section = {"format_version": EXPORT_FORMAT_VERSION, "routers_file": ROUTERS_FILE,
               "mode": router_cfg.get("mode"), "capacity": router_cfg.get("capacity"),
               "kv_policy": router_cfg.get("kv_policy"), "router_config": router_cfg,
               "source_checkpoint": str(ckpt.path), "base_model": str(base_dir), "stage": ckpt.stage}
    if lora is not None:
        section["lora"] = {"merged": True, "r": lora.r, "alpha": lora.alpha, "target_modules": lora.target_modules,
                           "pairs": len(lora.pairs), "source": lora.source}
    return section


def _write_config(tmp: Path, model: BaseModel, ckpt: Checkpoint, routers_meta: dict, lora: Optional[Lora]) -> None:
    config = dict(model.config)
    router_cfg = json.loads(routers_meta["skipgpt_router_config"])
    config["skipgpt"] = skipgpt_section(router_cfg, ckpt, lora, model.folder)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_generation_config(tmp: Path, model: BaseModel) -> None:
    source = model.folder / "generation_config.json"
    if source.is_file():
        shutil.copyfile(source, tmp / "generation_config.json")
        return
    config = {k: model.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in model.config}
    (tmp / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _copy_tokenizer(tmp: Path, base_dir: Path, ckpt: Checkpoint, log: Log) -> None:
    """The base model's tokenizer files, or the copy train.py saved in the run folder."""
    for folder in (base_dir, ckpt.path.parent.parent / "tokenizer"):
        files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
        if files:
            for path in files:
                shutil.copyfile(path, tmp / path.name)
            return
    log(f"warning: no tokenizer files in {base_dir} or the run folder: the output has none; copy them in by hand")


# ---------------------------------------------------------------- consolidate


def consolidate(checkpoint: str | Path, out: str | Path, trainable_only: bool = False, force: bool = False,
                base: Optional[str] = None, log: Log = _log) -> Path:
    """One safetensors file from any checkpoint (one process, ZeRO, DCP), keyed as the state_dict of the model
    train.py trains (peft names in stage 2). Full: base weights (from the base model folder) + routers + LoRA;
    trainable_only: routers + LoRA. Trained tensors come from the engine's files (fp32 masters), else from the
    portable artifacts."""
    from .assets import resolve_model_path

    _check_new_path(Path(out).absolute(), force, "--out")  # cheap checks first
    ckpt = open_checkpoint(checkpoint)
    trained = _trained_tensors(ckpt)
    out = Path(out)
    base_dir = Path(resolve_model_path(base if base is not None else ckpt.cfg.model.path))
    _check_not_inside(out, {"checkpoint": ckpt.path, "base model": base_dir}, "--out")
    specs, produce = _trained_specs(trained)
    metadata = {"format": "pt", "skipgpt_stage": ckpt.stage, "skipgpt_source": str(ckpt.path),
                "skipgpt_contents": "trainable" if trainable_only else "full"}
    _, routers_meta = read_routers(ckpt)
    metadata["skipgpt_router_config"] = routers_meta["skipgpt_router_config"]
    with contextlib.ExitStack() as stack:
        if not trainable_only:
            model = open_base_model(base_dir)
            check_fits(model, None, routers_meta, ckpt)
            lora_modules = {k[len(PEFT_PREFIX):].split(".lora_")[0] for k in trained if ".lora_" in k}
            base_specs, source = _base_specs(model, ckpt.stage, lora_modules)
            reader = stack.enter_context(ShardReader(model.folder))
            specs = base_specs + specs

            def produce(spec: TensorSpec) -> torch.Tensor:
                return reader.get(*source[spec.name]) if spec.name in source else trained[spec.name]
        with atomic_file(out, force) as tmp:
            size = _write_or_explain(tmp, specs, produce, metadata)
    log(f"wrote {out}: {len(specs)} tensors, {size / 2**20:.1f} MiB ({metadata['skipgpt_contents']}, stage "
        f"{ckpt.stage}, {ckpt.backend_name} checkpoint)")
    return out


def _trained_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Routers + LoRA under the training model's names."""
    prefix = PEFT_PREFIX if ckpt.stage == 2 else ""
    engine = engine_trainable_state(ckpt)
    trained = {k: v for k, v in engine.items() if "skipgpt_" in k or ".lora_" in k}
    if not any("skipgpt_" in k for k in trained):  # frozen routers (stage 2) are not in the engine's files
        routers, _ = read_routers(ckpt)
        for key, tensor in routers.items():
            m = _SAVED_ROUTER_KEY.match(key)
            trained[f"{prefix}model.layers.{m[1]}.skipgpt_{m[2]}_router.{m[3]}"] = tensor
    if ckpt.stage == 2 and not any(".lora_" in k for k in trained):
        trained.update(read_lora(ckpt, prefer="adapter").raw)
    return dict(sorted(trained.items()))


def _trained_specs(trained: dict[str, torch.Tensor]):
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in trained.items()]
    return specs, lambda spec: trained[spec.name]


def _base_specs(model: BaseModel, stage: int, lora_modules: set[str]):
    """Base tensors renamed as in the training model (stage 2: peft prefix, adapted weights under base_layer).
    Returns (specs in shard order, training name -> (shard, key))."""
    def rename(key: str) -> str:
        if stage != 2:
            return key
        module, _, leaf = key.rpartition(".")
        return f"{PEFT_PREFIX}{module}.base_layer.{leaf}" if module in lora_modules else f"{PEFT_PREFIX}{key}"

    specs, source = [], {}
    for shard, shard_specs in model.shards.items():
        for spec in shard_specs:
            specs.append(TensorSpec(rename(spec.name), spec.dtype, spec.shape))
            source[specs[-1].name] = (shard, spec.name)
    return specs, source
