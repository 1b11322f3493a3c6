"""Import routers (and LoRA) trained with the official SkipGPT code into a skipgpt-dist checkpoint folder.

    python tools/import_official.py --routers Llama-2-7b_router_attn_mlp_0.25_loraFalse/checkpoint-3200/model.pth \
        --base models/Llama-2-7b --out runs/llama2_official_stage1
    python tools/import_official.py --routers Llama-2-7b_post_training_0.25_post_training/checkpoint-800/model.bin \
        --base models/Llama-2-7b --out runs/llama2_official_stage2        # its LoRA comes along (stage 2)
    python tools/merge_lora.py --checkpoint runs/llama2_official_stage2 --out exported/llama2-skipgpt

--routers: a file the official code wrote with torch.save(model.state_dict()) (model.pth / model.bin), the same
tensors as .safetensors, or the official checkpoint-N folder holding one. --lora (optional): LoRA weights from another
file, the same kinds of file or a peft adapter folder; without it, LoRA tensors found in the --routers file (the
official stage-2 file holds both) are imported. Files are read with torch.load(weights_only=True) (memory-mapped) or
safetensors only, never unpickled otherwise.

The output is a checkpoint folder in train.py's layout (config.yaml, trainer_state.json with its file manifest,
routers.safetensors, adapter/ in peft's format after stage 2): tools/eval_ppl.py, tools/calibrate_routers.py,
tools/routing_report.py, tools/merge_lora.py (stage 2), skipgpt_dist.load_routed_model and stage.init_from (train
this project's stage 2 on imported stage-1 routers) read it. It is written into a temp folder and renamed into place;
an existing --out is refused, and --force replaces only an earlier import.

What the official code does (EIT-NLP/SkipGPT at fb2a203), and what the import keeps:
- Router (router_attn_mlp.py:33-63, class TokenRouter): hidden_layer = Linear(d, d//4), ReLU, weight_predictor =
  Linear(d//4, 2), both with bias; it reads the hidden state cast to its weight dtype (:57), no normalisation. Kept:
  router_type=mlp (net.0 <- hidden_layer, net.2 <- weight_predictor), normalize_input=false. The commented-out
  Linear(d, 2) router (:11-31, weight_predictor only) imports as router_type=linear.
- Routers per layer (:68-69): router_attention and router_mlp; the HF layer itself is `block` (:70), so the base
  weights sit under layers.N.block.* (checked against --base where the file holds them).
- Router input (:131, :146, :167): both routers read the layer input (hidden_states before input_layernorm; the MLP
  router reads `residual`, the same tensor). Kept: mlp_router_input=block_input.
- Logit order (:136-138, :161, :187): index 0 multiplies the sublayer output (execute), index 1 is the skip mask:
  [execute, skip], this project's order, so the rows are copied as they are (OFFICIAL_ROWS).
- Attention runs on every token (:148-158) and only its output is gated: skipped tokens still write K/V. Kept:
  kv_policy=all.
- Gates (:134, :170): F.gumbel_softmax(hard=True) in training AND in evaluation (at final_temperature, :127-128):
  the official evaluation samples its gates, so its perplexities are of a random skip pattern (a token executes with
  probability softmax(logits)[0]). CHANGED: this project decides deterministically, execute iff logit_execute >
  logit_skip (design.md section 1; a tie skips), so an imported model's outputs are reproducible and the skipped
  compute is known before a sublayer runs (real skipping: mode=capacity, capacity 1.0, which equals mask mode
  exactly at evaluation). Its skip rate is the share of tokens with a negative margin, not the mean of
  sigmoid(-margin) that the sampled official evaluation reports; tools/calibrate_routers.py shifts the biases to a
  target skip rate. The official stage 2 trains its LoRA under sampled gates too (routers frozen, still sampling at
  final_temperature, :123-128); an imported LoRA is served under the deterministic ones.
- Router precision: the official routers run in their own dtype (:57, :61); imported routers are stored and run in
  fp32 (bf16 router weights convert exactly), so decisions can differ from a bf16 run only at near-ties.
- Sparsity loss (custom_trainer.py:88, :119): LM + 20 * |(1 - sparsity) - (attn mean + mlp mean) / 2|, means over
  all positions, padding included (router_attn_mlp.py:143, :177); default sparsity 0.2 (main.py:14), temperature
  5 -> 1 (main.py:21-22). The imported RouterConfig records --target-sparsity (default 0.2) and --alpha (default
  20) for anything that trains or calibrates the routers further; this project's loss excludes padding.
- Checkpoints (torch_save.py:18-23, :41-46): torch.save(model.state_dict()) of the whole model: stage 1
  (method router_attn_mlp) keys model.layers.N.router_attention.hidden_layer.weight ...; stage 2 (post_training, a
  PeftModel, train_processing_two_stages.py:89-100, :119-120) keys base_model.model.model.layers.N.router_* and
  base_model.model.model.layers.N.block.<module>.lora_A.default.weight. A whole pickled model (models.py:50,
  torch.save(model)) is refused: weights_only=True cannot read it; save its state_dict() in the official code.
- LoRA (train_processing_two_stages.py:72-77, :90-96): r=16, lora_alpha=32, q_proj/v_proj(/gate_proj), dropout 0.1.
  The state dict holds no alpha: --lora-alpha (default 32) sets it, or the adapter_config.json of a peft folder.
- Families: the official code wraps Llama and Gemma 2 (router_attn_mlp.py:380-390); the import attaches routers
  through this project's family adapters, so a family it does not support is a one-line error.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipgpt_dist.errors import SkipGPTError, run_cli  # noqa: E402

OFFICIAL_CODE = "EIT-NLP/SkipGPT@fb2a203"
# Which official logit row feeds each of this project's [execute, skip] logits (router_attn_mlp.py:136-138: row 0
# gates the sublayer output, row 1 is the skip mask): the same order.
OFFICIAL_ROWS = (0, 1)
OFFICIAL_LORA_ALPHA = 32  # train_processing_two_stages.py:74, :92
OFFICIAL_LORA_DROPOUT = 0.1  # train_processing_two_stages.py:76, :94
OFFICIAL_SPARSITY = 0.2  # main.py:14
OFFICIAL_ALPHA = 20.0  # custom_trainer.py:119
ROUTER_KINDS = {"router_attention": "skipgpt_attn_router", "router_mlp": "skipgpt_mlp_router"}
# official parameter -> this project's Router parameter, per architecture
ARCHS = {"mlp": {"hidden_layer.weight": "net.0.weight", "hidden_layer.bias": "net.0.bias",
                 "weight_predictor.weight": "net.2.weight", "weight_predictor.bias": "net.2.bias"},
         "linear": {"weight_predictor.weight": "net.weight", "weight_predictor.bias": "net.bias"}}
ROUTER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(router_attention|router_mlp)\.(.+)$")
LORA_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:block\.)?(.+?)\.lora_(A|B)(?:\.([^.]+))?\.weight$")
OURS_LORA_KEY = re.compile(r"layers\.(\d+)\.(.+?)\.lora_(A|B)\.default\.weight$")
STATE_FILES = ("model.pth", "model.bin", "model.safetensors", "pytorch_model.bin")
MARKER = "imported_from"  # the trainer_state.json key that marks an import (what --force may replace)


def log(msg: str) -> None:
    print(f"[import_official] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", required=True, help="official state dict (.pth/.pt/.bin/.safetensors) or the "
                                                         "official checkpoint-N folder holding one")
    parser.add_argument("--lora", default=None, help="LoRA weights: an official stage-2 state dict, or a peft adapter "
                                                     "folder/file (default: the lora_ tensors of --routers, if any)")
    parser.add_argument("--base", required=True, help="the base model folder the routers were trained on "
                                                      "(or builtin:NAME)")
    parser.add_argument("--out", required=True, help="output checkpoint folder (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an earlier import at --out (atomically)")
    parser.add_argument("--mode", choices=("capacity", "mask"), default="capacity",
                        help="execution mode recorded for evaluation and serving (capacity: real skipping)")
    parser.add_argument("--target-sparsity", type=float, default=OFFICIAL_SPARSITY,
                        help="the official run's --sparsity (for further training or calibration; default 0.2)")
    parser.add_argument("--alpha", type=float, default=OFFICIAL_ALPHA,
                        help="sparsity-loss weight recorded with the routers (official: 20)")
    parser.add_argument("--lora-alpha", type=int, default=None,
                        help="LoRA alpha of the official run (default: adapter_config.json's, else 32)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype the checkpoint loads the base in (default: the base's own, float32 if unsure)")
    parser.add_argument("--skip-base-check", action="store_true",
                        help="do not compare the base weights the file holds with --base")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- reading the official files


def state_file(path: Path, flag: str) -> Path:
    """The state-dict file a path names: itself, or the one file of STATE_FILES in an official checkpoint-N folder."""
    if path.is_file():
        return path
    if path.is_dir():
        found = [path / name for name in STATE_FILES if (path / name).is_file()]
        if len(found) == 1:
            return found[0]
        what = "several of " if found else "none of "
        raise SkipGPTError(f"{flag} {path} is a folder holding {what}{', '.join(STATE_FILES)}: name the file")
    raise SkipGPTError(f"{flag} {path} does not exist: give the official checkpoint's model.pth / model.bin")


def load_tensors(path: Path, flag: str) -> dict:
    """{key: tensor} of a safetensors file or a torch.save'd state dict (weights_only=True, memory-mapped)."""
    import pickle

    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError, OSError
            raise SkipGPTError(f"{flag} {path} is not a readable safetensors file ({str(err)[:120]}): copy it "
                               "again") from None
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        raise SkipGPTError(f"{flag} {path} holds Python objects besides tensors, which torch.load(weights_only=True) "
                           f"refuses ({str(err).splitlines()[0][:100]}): a whole model saved with torch.save(model) "
                           "is not imported; save model.state_dict() with the official code and import that") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise SkipGPTError(f"{flag} {path} is not a readable torch file ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:100] if str(err) else ''}): it is truncated or not a "
                           "state dict") from None
    return flat_state(state, path, flag)


def flat_state(state, path: Path, flag: str) -> dict:
    """A state dict, unwrapped from one level of {"module" / "state_dict" / "model": {...}} as engines save it."""
    import torch

    if isinstance(state, dict):
        for wrapper in ("module", "state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state:
        raise SkipGPTError(f"{flag} {path} holds a {type(state).__name__}, not a state dict of tensors: give the "
                           "file the official code saved with torch.save(model.state_dict())")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------- routers


def official_routers(state: dict, source: str, num_layers: int, hidden: int) -> tuple[str, dict]:
    """(router_type, {(layer, our router attribute): {our param: fp32 tensor}}), every shape checked."""
    found: dict = {}
    for key, tensor in state.items():
        match = ROUTER_KEY.match(key)
        if match:
            layer, kind, param = int(match[1]), match[2], match[3]
            found.setdefault((layer, ROUTER_KINDS[kind]), {})[param] = (key, tensor)
    if not found:
        raise SkipGPTError(unknown_layout(state, source))
    arch = "mlp" if any("hidden_layer.weight" in p for p in found.values()) else "linear"
    layers = sorted({layer for layer, _ in found})
    if layers != list(range(num_layers)):
        raise SkipGPTError(f"{source} holds routers for {len(layers)} layers (indices {layers[0]}..{layers[-1]}), "
                           f"the base model has {num_layers}: pass the base model the routers were trained on as "
                           "--base")
    out = {}
    for layer in layers:
        for name in ROUTER_KINDS.values():
            out[(layer, name)] = router_params(found.get((layer, name), {}), arch, source, layer, name, hidden)
    return arch, out


def router_params(params: dict, arch: str, source: str, layer: int, name: str, hidden: int) -> dict:
    import torch

    kind = {v: k for k, v in ROUTER_KINDS.items()}[name]
    wanted = ARCHS[arch]
    missing, extra = sorted(set(wanted) - set(params)), sorted(set(params) - set(wanted))
    if missing or extra:
        what = f"lacks {missing}" if missing else f"has unexpected {[params[p][0] for p in extra]}"
        raise SkipGPTError(f"{source}: layers.{layer}.{kind} {what} for the official {arch} router (keys "
                           f"{', '.join(wanted)}): the file is incomplete or from another router variant")
    inner = max(1, hidden // 4)
    shapes = ({"hidden_layer.weight": (inner, hidden), "hidden_layer.bias": (inner,),
               "weight_predictor.weight": (2, inner), "weight_predictor.bias": (2,)} if arch == "mlp" else
              {"weight_predictor.weight": (2, hidden), "weight_predictor.bias": (2,)})
    out = {}
    for param, (key, tensor) in params.items():
        if tensor.numel() == 0:
            raise SkipGPTError(f"{source}: {key} is empty: the file was saved under ZeRO-3 without gathering the "
                               "weights; save the full state dict (e.g. with zero_to_fp32) and import that")
        if tuple(tensor.shape) != shapes[param]:
            raise SkipGPTError(f"{source}: {key} is {tuple(tensor.shape)}, a router for hidden size {hidden} is "
                               f"{shapes[param]}: pass the base model the routers were trained on as --base")
        value = tensor.detach().to(torch.float32)
        if param.startswith("weight_predictor"):
            value = value[list(OFFICIAL_ROWS)]  # official rows -> [execute, skip]
        if not torch.isfinite(value).all():
            raise SkipGPTError(f"{source}: {key} holds NaN or inf: the official run diverged; import another "
                               "checkpoint")
        out[wanted[param]] = value.contiguous()
    return out


def unknown_layout(state: dict, source: str) -> str:
    sample = ", ".join(list(state)[:3])
    if any(re.match(r"^layers\.\d+\.(attn|mlp)_router\.", k) for k in state):
        return (f"{source} is already a skipgpt-dist router file (layers.N.attn_router.*): use it in a checkpoint "
                "as it is, no import needed")
    return (f"{source} holds no official SkipGPT routers (keys like model.layers.N.router_attention."
            f"hidden_layer.weight, router_attn_mlp.py:68-69; it has {len(state)} tensors, e.g. {sample}): give the "
            "state dict of a router_attn_mlp or post_training run")


# ---------------------------------------------------------------- LoRA


def official_lora(state: dict, source: str) -> dict:
    """{(layer, module path in the HF layer): {"A": tensor, "B": tensor}} of the lora_ tensors of a state dict."""
    pairs: dict = {}
    for key, tensor in state.items():
        if ".lora_" not in key:
            continue
        match = LORA_KEY.match(key)
        if match is None:
            raise SkipGPTError(f"{source} holds {key}, which is not a LoRA A/B weight of a decoder layer (DoRA, "
                               "embedding LoRA and biases are not imported): import plain LoRA on linear layers")
        if match[4] not in (None, "default"):
            raise SkipGPTError(f"{source} holds adapter {match[4]!r}: only one adapter (default) is imported")
        pairs.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
            raise SkipGPTError(f"{source}: the LoRA pair of layers.{layer}.{module} is incomplete or inconsistent "
                               f"({ {k: tuple(v.shape) for k, v in ab.items()} }): the file is damaged")
    ranks = {ab["A"].shape[0] for ab in pairs.values()}
    if len(ranks) > 1:
        raise SkipGPTError(f"{source}: LoRA pairs of different ranks {sorted(ranks)}: one rank is imported")
    return pairs


def read_lora(path: Path, routers_state: dict, routers_source: str) -> tuple[dict, dict, str]:
    """(pairs, adapter config or {}, source) from --lora (a state dict or a peft folder), or from --routers."""
    from skipgpt_dist.file_names import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

    if path is None:
        return official_lora(routers_state, routers_source), {}, routers_source
    config = {}
    if path.is_dir() and (path / ADAPTER_CONFIG_FILE).is_file():
        try:
            config = json.loads((path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SkipGPTError(f"--lora {path}/{ADAPTER_CONFIG_FILE} is not valid JSON ({err}): copy it "
                               "again") from None
        for bad, what in ((config.get("peft_type", "LORA") != "LORA", f"peft_type={config.get('peft_type')}"),
                          (bool(config.get("use_dora")), "use_dora"), (bool(config.get("use_rslora")), "use_rslora"),
                          (bool(config.get("modules_to_save")), "modules_to_save"),
                          (bool(config.get("rank_pattern") or config.get("alpha_pattern")), "rank/alpha patterns")):
            if bad:
                raise SkipGPTError(f"--lora {path} uses {what}, which the import does not carry: use plain LoRA")
        names = [n for n in (ADAPTER_WEIGHTS_FILE, "adapter_model.bin") if (path / n).is_file()]
        if not names:
            raise SkipGPTError(f"--lora {path} has {ADAPTER_CONFIG_FILE} but no {ADAPTER_WEIGHTS_FILE} (or .bin)")
        path = path / names[0]
    else:
        path = state_file(path, "--lora")
    pairs = official_lora(load_tensors(path, "--lora"), f"--lora {path}")
    if not pairs:
        raise SkipGPTError(f"--lora {path} holds no lora_A/lora_B tensors: give the official post_training "
                           "state dict or a peft adapter")
    return pairs, config, f"--lora {path}"


# ---------------------------------------------------------------- the base model


def check_same_base(state: dict, source: str, base_dir: Path) -> int:
    """The base weights an official full state dict carries (embeddings; layer 0's sublayers under `block.`)
    must be --base's, cast to the file's dtype (the official code loads the base in bf16, models.py:25-29).
    Returns how many tensors were compared (0: the file holds none, or the base has no safetensors)."""
    import torch

    from skipgpt_dist.export import ShardReader, open_base_model
    from skipgpt_dist.file_names import INDEX_FILE, SINGLE_FILE

    if not ((base_dir / INDEX_FILE).is_file() or (base_dir / SINGLE_FILE).is_file()):
        return 0
    base = open_base_model(base_dir)
    shard_of = {spec.name: shard for shard, specs in base.shards.items() for spec in specs}
    compared = 0
    with ShardReader(base.folder) as reader:
        for key, tensor in state.items():
            match = re.match(r"^(?:.*\.)?(embed_tokens|layers\.0\.block\.[\w.]+?)(?:\.base_layer)?\.weight$", key)
            ours = "model." + match[1].replace("block.", "", 1) + ".weight" if match and ".lora_" not in key else None
            if ours not in shard_of:
                continue
            theirs = reader.get(shard_of[ours], ours)
            if tuple(theirs.shape) != tuple(tensor.shape) or not torch.equal(theirs.to(tensor.dtype), tensor):
                raise SkipGPTError(f"{source}: its base weight {key} differs from {ours} of --base {base_dir}: the "
                                   "routers were trained on another model; pass that model as --base (or "
                                   "--skip-base-check)")
            compared += 1
    return compared


def base_config(base_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(base_dir))
    except Exception as err:  # transformers raises many types for a bad config.json
        raise SkipGPTError(f"--base {base_dir}: config.json is not a Hugging Face model config "
                           f"({type(err).__name__}): give the folder saved with save_pretrained") from None


def routed_model(config, base_dir: Path, router_cfg, routers: dict):
    """The base architecture on the meta device (no base weights are read) with the official routers attached."""
    import torch
    from transformers import AutoModelForCausalLM

    from skipgpt_dist.routing import attach_routers, routed_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        attach_routers(model, router_cfg)
    for idx, layer in enumerate(routed_layers(model)):
        for name in ROUTER_KINDS.values():
            getattr(layer, name).load_state_dict(routers[(idx, name)], assign=True)
    model.config._name_or_path = str(base_dir)
    return model


def with_lora(model, pairs: dict, adapter_config: dict, lora_alpha, source: str):
    """A peft model over `model` holding the official LoRA pairs (every target module of every layer)."""
    import torch
    from peft import LoraConfig, get_peft_model

    rank = next(iter(pairs.values()))["A"].shape[0]
    alpha = lora_alpha or adapter_config.get("lora_alpha") or OFFICIAL_LORA_ALPHA
    targets = sorted({module.rsplit(".", 1)[-1] for _, module in pairs})
    config = LoraConfig(r=int(rank), lora_alpha=int(alpha), target_modules=targets, task_type="CAUSAL_LM",
                        lora_dropout=float(adapter_config.get("lora_dropout", OFFICIAL_LORA_DROPOUT)))
    peft_model = get_peft_model(model, config)
    slots = {}
    for key, param in peft_model.state_dict().items():
        match = OURS_LORA_KEY.search(key)
        if match:
            slots[(int(match[1]), match[2], match[3])] = (key, tuple(param.shape))
    values = {}
    for (layer, module), ab in pairs.items():
        for half in ("A", "B"):
            key, shape = slots.pop((layer, module, half), (None, None))
            if key is None or tuple(ab[half].shape) != shape:
                raise SkipGPTError(f"{source}: LoRA of layers.{layer}.{module} ({tuple(ab[half].shape)}) fits no "
                                   f"module of --base (expected {shape}): pass the base model it was trained on")
            values[key] = ab[half].detach().to(torch.float32).contiguous()
    if slots:
        (layer, module, _), _ = next(iter(slots.items()))
        raise SkipGPTError(f"{source}: no LoRA weights for layers.{layer}.{module} though other layers adapt "
                           f"{module.rsplit('.', 1)[-1]}: the file is incomplete")
    peft_model.load_state_dict(values, strict=False, assign=True)
    return peft_model, config


# ---------------------------------------------------------------- the output folder


def is_import(folder: Path) -> bool:
    from skipgpt_dist.file_names import STATE_FILE

    try:
        return MARKER in json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_out(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise SkipGPTError(f"--out {out} already exists: pass --force to replace it, or choose a new path")
    empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if not (empty or (out.is_dir() and is_import(out))):
        raise SkipGPTError(f"--out {out} exists and is not a folder written by import_official.py, so --force does "
                           "not replace it: remove it yourself or choose another path")


@contextlib.contextmanager
def atomic_out(out: Path, force: bool):
    """A temp folder that becomes `out` once complete and flushed (atomic_dir); an earlier import at `out` is
    swapped out only then. On any error `out` is untouched."""
    from skipgpt_dist.export import atomic_dir
    from skipgpt_dist.export.atomic import replace_path

    out = out.absolute()
    check_out(out, force)
    if not out.exists():
        with atomic_dir(out) as tmp:
            yield tmp
        return
    staging = out.with_name(f".{out.name}.import-{os.getpid()}")
    with atomic_dir(staging) as tmp:
        yield tmp
    try:
        replace_path(staging, out)  # (the earlier import is restored if the swap fails)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def train_config(args, config, base_dir: Path, out: Path, router_cfg, lora_config):
    """The resolved config.yaml of the import: stage 1 (routers) or 2 (routers + LoRA) on --base, loaded in the
    base's own dtype unless --dtype says otherwise."""
    from skipgpt_dist.config import load_config

    cfg = load_config(None)
    cfg.run_dir, cfg.model.path, cfg.routers = str(out), str(base_dir), router_cfg
    own = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)).replace("torch.", "")
    cfg.model.dtype = args.dtype or ("bfloat16" if own == "bfloat16" else "float32")
    if lora_config is not None:
        cfg.stage.stage, cfg.stage.init_from = 2, str(out)
        cfg.stage.lora.r, cfg.stage.lora.alpha = int(lora_config.r), int(lora_config.lora_alpha)
        cfg.stage.lora.dropout = float(lora_config.lora_dropout)
        cfg.stage.lora.target_modules = sorted(lora_config.target_modules)
    return cfg.validate()


def write_checkpoint(tmp: Path, model, peft_model, cfg, provenance: dict) -> None:
    from skipgpt_dist.checkpoint_manifest import record_files
    from skipgpt_dist.config import save_config
    from skipgpt_dist.file_names import ADAPTER_DIR, CONFIG_FILE, ROUTERS_FILE, STATE_FILE
    from skipgpt_dist.routing import save_routers

    save_routers(model, tmp / ROUTERS_FILE)
    if peft_model is not None:
        peft_model.save_pretrained(str(tmp / ADAPTER_DIR))
    save_config(cfg, tmp / CONFIG_FILE)
    state = {"step": 0, "stage": cfg.stage.stage, "backend": "none", "complete": True, MARKER: provenance}
    (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    record_files(tmp)  # the file manifest, so the import verifies like any checkpoint


# ---------------------------------------------------------------- main


def import_official(args) -> Path:
    from skipgpt_dist.assets import resolve_model_path
    from skipgpt_dist.routing import RouterConfig

    started, out = time.time(), Path(args.out).expanduser()
    check_out(out.absolute(), args.force)  # cheap checks before anything is read
    if not args.base.startswith("builtin:") and not (Path(args.base).expanduser() / "config.json").is_file():
        raise SkipGPTError(f"--base {args.base} is not a Hugging Face model folder (no config.json): give the folder "
                           "of the model the routers were trained on, saved with save_pretrained")
    base_dir = Path(resolve_model_path(args.base))
    routers_path = state_file(Path(args.routers).expanduser(), "--routers")
    source = f"--routers {routers_path}"
    state = load_tensors(routers_path, "--routers")
    log(f"read {len(state)} tensors from {routers_path}")
    config = base_config(base_dir)
    num_layers = int(config.num_hidden_layers)
    arch, routers = official_routers(state, source, num_layers, int(config.hidden_size))
    dtypes = sorted({str(state[k].dtype).replace("torch.", "") for k in state if ROUTER_KEY.match(k)})
    log(f"routers: {num_layers} layers x (attention, MLP), official {arch} router ({'/'.join(dtypes)} -> float32), "
        "logits [execute, skip] as the official rows 0, 1")
    if not args.skip_base_check:
        compared = check_same_base(state, source, base_dir)
        log(f"base check: {compared} base tensors of the file equal --base {base_dir}" if compared else
            "base check: the file holds no base weights to compare with --base")
    router_cfg = RouterConfig(router_type=arch, normalize_input=False, mlp_router_input="block_input",
                              kv_policy="all", mode=args.mode, capacity=1.0, target_sparsity=args.target_sparsity,
                              alpha=args.alpha, temperature_start=5.0, temperature_end=1.0)
    model = routed_model(config, base_dir, router_cfg, routers)
    pairs, adapter_config, lora_source = read_lora(Path(args.lora).expanduser() if args.lora else None, state,
                                                   source)
    peft_model, lora_config = with_lora(model, pairs, adapter_config, args.lora_alpha, lora_source) if pairs \
        else (None, None)
    if lora_config is not None:
        log(f"LoRA: {len(pairs)} pairs from {lora_source} (r={lora_config.r}, alpha={lora_config.lora_alpha}, "
            f"{', '.join(sorted(lora_config.target_modules))}): stage 2")
    cfg = train_config(args, config, base_dir, out.absolute(), router_cfg, lora_config)
    provenance = {"code": OFFICIAL_CODE, "routers": str(routers_path.absolute()), "router_type": arch,
                  "lora": lora_source if pairs else None, "gates": "deterministic (official: sampled)"}
    with atomic_out(out, args.force) as tmp:
        write_checkpoint(tmp, model, peft_model, cfg, provenance)
    log(f"wrote {out} (stage {cfg.stage.stage}, mode={args.mode}, kv_policy=all) in {time.time() - started:.1f} s")
    return out


@run_cli
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not 0.0 <= args.target_sparsity < 1.0:
        raise SkipGPTError(f"--target-sparsity={args.target_sparsity} is out of range: use a fraction in [0, 1)")
    return import_official(args)


if __name__ == "__main__":
    main()
