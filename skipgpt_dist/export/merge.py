"""merge_lora: fold a stage-2 checkpoint's LoRA into the base weights and write a self-contained routed model
folder. Streams: the base model's shards are read one at a time and each output shard is written tensor by tensor,
so peak memory is about one shard plus the adapters, never the whole model."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..file_names import INDEX_FILE, ROUTERS_FILE, TOKENIZER_FILES
from .atomic import check_new_path, check_not_inside, check_replaceable_dir, atomic_dir
from .base_model import BaseModel, ShardReader, open_base_model
from .checkpoint_reader import Checkpoint, open_checkpoint, read_routers
from .lora import Lora, read_lora
from .safetensors_writer import TensorSpec, write_or_explain
from .shared import Log, print_log, check_fits

EXPORT_FORMAT_VERSION = 1


def merge_lora(checkpoint: str | Path, out: str | Path, base: Optional[str] = None, force: bool = False,
               log: Log = print_log) -> Path:
    """Fold a stage-2 checkpoint's LoRA into the base weights and write a self-contained routed model folder:
    HF safetensors shards + index, routers.safetensors, config.json with a `skipgpt` section, generation config and
    tokenizer. Loads with load_routed_model (routed) or AutoModelForCausalLM.from_pretrained (dense)."""
    from ..assets import resolve_model_path

    check_new_path(Path(out).absolute(), force, "--out")  # cheap checks first
    check_replaceable_dir(Path(out).absolute(), "--out")
    ckpt = open_checkpoint(checkpoint)
    _, routers_meta = read_routers(ckpt)
    lora = read_lora(ckpt, prefer="adapter")
    base_dir = Path(resolve_model_path(base if base is not None else ckpt.cfg.model.path))
    model = open_base_model(base_dir)
    check_fits(model, lora, routers_meta, ckpt)
    out = Path(out)
    check_not_inside(out, {"base model": base_dir, "checkpoint": ckpt.path}, "--out")
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

            size = write_or_explain(tmp / name, specs, produce, {"format": "pt"})
        total, merged = total + size, merged + count
        weight_map.update({spec.name: name for spec in specs})
        log(f"[merge_lora] shard {i}/{len(model.shards)} {name}: {len(specs)} tensors, {count} merged, "
            f"{size / 2**20:.1f} MiB, {time.time() - t0:.2f} s")
    if merged != len(lora.pairs):
        raise RuntimeError(f"merged {merged} LoRA pairs, expected {len(lora.pairs)}")
    return weight_map, total


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
