"""`--model skipgpt` for EleutherAI lm-evaluation-harness: score a routed model (routers on or off) on lm-eval tasks.

    skipgpt-lm-eval --model skipgpt --model_args pretrained=exported/ --tasks hellaswag --output_path evals/
    skipgpt-lm-eval --model skipgpt --model_args pretrained=exported/,routing=off --tasks skipgpt_mc \
        --include_path skipgpt_dist/lm_eval_tasks

`skipgpt-lm-eval` (also `python -m skipgpt_dist.lm_eval_model`) is lm-eval's own command line, unchanged, with
the `skipgpt` model registered first. Why a wrapper and not `lm_eval --model skipgpt`: lm-eval 0.4.13 finds a
model name only in its built-in table (lm_eval/models/__init__.py MODEL_MAPPING) or among classes that some
already-imported module registered with `@register_model`; it reads no entry-point group and has no flag that
imports a user module (`--include_path` loads task YAMLs only). So nothing an installed package declares can reach
the `lm_eval` command, short of a `.pth` start-up hook that would run in every Python process of the environment.
The wrapper also checks the model arguments before lm-eval indexes its ~15,000 task files, and turns a
SkipGPTError into one `error:` line with exit status 2. From Python, import this module and pass the name:
`lm_eval.simple_evaluate(model="skipgpt", model_args={"pretrained": DIR}, ...)`.

Model arguments (`--model_args key=value,...`):
- `pretrained=DIR` (required): a folder exported by tools/merge_lora.py, or a training checkpoint / run folder.
- `mode=mask|capacity|expert_choice`, `capacity=0.75`: execute differently from the trained routing.
- `routing=on|off`: `off` runs the same weights with every sublayer executed (the dense comparison).
- `dtype=float32|bfloat16|float16` (default: as saved), `device` (default: cuda if available, else cpu), and
  lm-eval's own `max_length`, `truncation`, `logits_cache`, `add_bos_token`, ... Batch size: `--batch_size`.

Batching: lm-eval pads a loglikelihood batch on the right and calls the model without an attention mask. Under
`mask`, or `capacity` with capacity 1, padding after a sequence cannot change its scores (causal attention,
per-token gates), so any batch size gives the same result. Under `capacity` < 1 and `expert_choice` the padding
would compete for the execute slots, so those modes need batch size 1 (a one-line error says so).

The achieved routing is recorded in the results JSON under `config.skipgpt`: execute fractions of attention and
MLP, sparsity and overflow, summed over every loglikelihood forward of the run (generation steps are not counted;
with batch size > 1, right padding counts as tokens).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import SkipGPTError, run_cli
from .routing import routing_context, routing_disabled, routing_stats
from .routing.config import MODES

try:
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
except ModuleNotFoundError as err:  # lm-eval is an optional extra
    if not (err.name or "").startswith("lm_eval"):
        raise
    raise SkipGPTError("lm-eval is not installed: pip install 'skipgpt-dist[eval]' (lm-eval==0.4.13)") from None

TASKS_DIR = str(Path(__file__).with_name("lm_eval_tasks"))  # pass to --include_path for the skipgpt_mc task
_OWN_ARGS = ("pretrained", "mode", "capacity", "routing", "dtype", "device", "inference_slots")
# HFLM arguments that still mean something when the model object is built here (the rest are loading options);
# lm-eval's CLI fills the batch ones from --batch_size / --max_batch_size and trust_remote_code from its flag.
_BATCH_ARGS = ("batch_size", "max_batch_size")
_HFLM_OPTIONS = ("max_length", "truncation", "logits_cache", "add_bos_token", "prefix_token_id", "softmax_dtype",
                 "mixed_precision_dtype", "think_end_token", "enable_thinking", "chat_template_args")
_HFLM_ARGS = _BATCH_ARGS + _HFLM_OPTIONS + ("trust_remote_code",)
_ON_OFF = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
_WHAT = "a folder exported by tools/merge_lora.py, or a training checkpoint / run folder"
log = logging.getLogger("lm_eval.models.skipgpt")  # a child of lm-eval's logger, so it prints like lm-eval's


@dataclass
class ModelArgs:
    pretrained: str
    mode: Optional[str] = None
    capacity: Optional[float] = None
    routing: bool = True
    dtype: Optional[str] = None
    device: Optional[str] = None
    inference_slots: Optional[str] = None  # static: capacity slots as in training (overflow skips); default dynamic
    hflm: dict = field(default_factory=dict)  # passed on to HFLM unchanged


def check_model_args(args: dict) -> ModelArgs:
    """Validated `--model_args`; a SkipGPTError naming the argument and the fix otherwise."""
    unknown = sorted(set(args) - set(_OWN_ARGS) - set(_HFLM_ARGS))
    if unknown:
        raise SkipGPTError(f"unknown model_args {', '.join(unknown)} for --model skipgpt: use pretrained=DIR, mode, "
                           f"capacity, routing=on|off, dtype, device, inference_slots=dynamic|static (or lm-eval's {', '.join(_HFLM_OPTIONS)})")
    pretrained = args.get("pretrained")
    if pretrained in (None, ""):
        raise SkipGPTError(f"--model skipgpt needs --model_args pretrained=DIR: {_WHAT}")
    if not Path(str(pretrained)).expanduser().is_dir():
        raise SkipGPTError(f"pretrained={pretrained} is not a folder: give {_WHAT}")
    mode = args.get("mode")
    if mode is not None and mode not in MODES:
        raise SkipGPTError(f"mode={mode!r} is not a routing mode: use one of {', '.join(MODES)} "
                           "(or leave it out for the trained mode)")
    slots = args.get("inference_slots")
    if slots is not None and slots not in ("dynamic", "static"):
        raise SkipGPTError(f"inference_slots={slots!r} is not supported: use dynamic (no overflow, skipped sublayers "
                           "cost nothing) or static (capacity slots as in training)")
    return ModelArgs(str(Path(str(pretrained)).expanduser()), mode, _capacity(args.get("capacity")),
                     _routing(args.get("routing", "on")), _dtype(args.get("dtype")), args.get("device"), slots,
                     {k: v for k, v in args.items() if k in _HFLM_ARGS})


def _capacity(value) -> Optional[float]:
    if value is None:
        return None
    try:
        capacity = float(value)
    except (TypeError, ValueError):
        capacity = -1.0
    if not 0.0 < capacity <= 1.0:
        raise SkipGPTError(f"capacity={value!r} is not a fraction in (0, 1]: e.g. capacity=0.75 gives each routed "
                           "sublayer slots for 75% of a sequence's tokens")
    return capacity


def _routing(value) -> bool:
    key = str(value).lower()
    if key not in _ON_OFF:
        raise SkipGPTError(f"routing={value!r} is not on or off: routing=on uses the routers, routing=off runs the "
                           "same weights with every sublayer executed")
    return _ON_OFF[key]


def _dtype(value) -> Optional[str]:
    from .inference import _DTYPES  # the names load_routed_model accepts

    if value in (None, "auto"):  # HFLM's default: keep the saved dtype
        return None
    if value not in _DTYPES:
        raise SkipGPTError(f"dtype={value!r} is not supported: use float32, bfloat16 or float16 (or leave it out "
                           "for the saved dtype)")
    return value


def load_model_and_tokenizer(opts: ModelArgs):
    """(routed model in eval mode, tokenizer) from an exported folder or a training checkpoint / run folder."""
    import torch

    from .inference import _place, load_routed_model, skipgpt_section

    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI default is cuda:0
        log.warning("skipgpt: device %s requested but CUDA is not available: running on cpu (as lm-eval's hf "
                    "model does)", device)
        device = "cpu"
    folder = Path(opts.pretrained)
    if skipgpt_section(folder) is None and not (folder / "config.json").is_file():
        from .training.restore import load_checkpoint_model  # base + routers (+ LoRA) and the base's tokenizer

        model, tokenizer, _ = load_checkpoint_model(str(folder), opts.mode, opts.capacity)
        return _with_slots(_place(model, opts.dtype, device), opts), tokenizer
    model = load_routed_model(folder, opts.mode, opts.capacity, opts.dtype, device)
    return _with_slots(model, opts), _folder_tokenizer(folder)


def _with_slots(model, opts: ModelArgs):
    if opts.inference_slots is not None:
        from .routing import routing_context

        routing_context(model).cfg.inference_slots = opts.inference_slots
    return model


def _folder_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many types for missing or broken tokenizer files
        raise SkipGPTError(f"{folder} has no usable tokenizer ({type(err).__name__}): copy the base model's "
                           "tokenizer files into it") from None


def _check_batching(cfg, batch_size) -> None:
    """Right padding without an attention mask is harmless unless padding can take execute slots (see above)."""
    competes = cfg.mode == "expert_choice" or (cfg.mode == "capacity" and cfg.capacity < 1.0)
    if competes and str(batch_size) != "1":
        raise SkipGPTError(f"batch_size={batch_size} with mode={cfg.mode} capacity={cfg.capacity}: lm-eval pads "
                           "batches without an attention mask, so padding would take execute slots and change the "
                           "scores; use --batch_size 1, or mode=mask (no slot limit), or routing=off")


class SparsityMeter:
    """Executed and routed token counts summed over forwards (routing_stats describes the last forward only)."""

    def __init__(self):
        self.executed = {"attn": 0.0, "mlp": 0.0}
        self.tokens = {"attn": 0, "mlp": 0}
        self.overflow, self.forwards = 0, 0

    def add(self, stats: dict) -> None:
        self.forwards += 1
        for layer in stats["layers"]:
            for kind, entry in layer.items():
                self.executed[kind] += entry["execute"] * entry["tokens"]
                self.tokens[kind] += entry["tokens"]
                self.overflow += entry["overflow"]

    def summary(self) -> dict:
        attn, mlp = (self.executed[k] / max(self.tokens[k], 1) for k in ("attn", "mlp"))
        return {"attn_execute": attn, "mlp_execute": mlp, "sparsity": 1.0 - (attn + mlp) / 2,
                "overflow": self.overflow, "forwards": self.forwards}


class SkipGPTLM(HFLM):
    """HFLM around a routed model built by load_routed_model; routing on or off for every forward."""

    def __init__(self, pretrained=None, mode=None, capacity=None, routing="on", dtype=None, device=None,
                 batch_size=1, max_batch_size=64, **kwargs):
        args = {"pretrained": pretrained, "mode": mode, "capacity": capacity, "routing": routing, "dtype": dtype,
                "device": device, **kwargs}
        opts = check_model_args({k: v for k, v in args.items() if v is not None})
        model, tokenizer = load_model_and_tokenizer(opts)
        cfg = routing_context(model).cfg
        if opts.routing:
            _check_batching(cfg, batch_size)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                         max_batch_size=max_batch_size, **opts.hflm)
        self.skipgpt_args, self.router_cfg = opts, cfg
        self.meter = SparsityMeter() if opts.routing else None
        log.info("skipgpt: %s, routing %s (mode %s, capacity %s, kv_policy %s)", opts.pretrained,
                 "on" if opts.routing else "off", cfg.mode, cfg.capacity, cfg.kv_policy)

    def _routing_scope(self):
        return contextlib.nullcontext() if self.skipgpt_args.routing else routing_disabled(self.model)

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self._routing_scope():
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if self.meter is not None:
            self.meter.add(routing_stats(self.model))
        return logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._routing_scope():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def routing_summary(self) -> dict:
        cfg, summary = self.router_cfg, {"pretrained": self.skipgpt_args.pretrained}
        summary.update(routing="on" if self.meter is not None else "off", mode=cfg.mode, capacity=cfg.capacity,
                       kv_policy=cfg.kv_policy, inference_slots=cfg.inference_slots)
        return {**summary, **(self.meter.summary() if self.meter is not None else {})}

    def get_model_info(self) -> dict:
        # HFLM's version asks the Hugging Face Hub for revision hashes, which a local folder does not have.
        summary = self.routing_summary()
        if self.meter is not None:
            log.info("skipgpt routing: sparsity %.3f (attention executes %.3f, MLP %.3f, overflow %d) over %d "
                     "forwards", summary["sparsity"], summary["attn_execute"], summary["mlp_execute"],
                     summary["overflow"], summary["forwards"])
        params = list(self.model.parameters())
        return {"model_num_parameters": sum(p.numel() for p in params), "model_dtype": str(params[0].dtype),
                "skipgpt": summary}


def register() -> None:
    """Make `--model skipgpt` known to lm-eval (importing this module does it). Idempotent, so running this file
    as `python -m` (a second copy of the module, named __main__) does not collide with the package's copy."""
    if "skipgpt" not in model_registry:
        model_registry.register("skipgpt", target=SkipGPTLM)


register()


@run_cli
def main(argv=None) -> None:
    """`skipgpt-lm-eval ARGS`: lm-eval's command line (`lm_eval ARGS`) with `--model skipgpt` available."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    sys.argv = ["skipgpt-lm-eval", *(sys.argv[1:] if argv is None else argv)]  # HarnessCLI reads sys.argv
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    if getattr(args, "model", None) == "skipgpt" and not getattr(args, "config", None):
        _check_cli_model_args(args.model_args or {})  # before lm-eval spends seconds indexing its tasks
    parser.execute(args)


def _check_cli_model_args(model_args: dict) -> None:
    clash = [key for key in _BATCH_ARGS if key in model_args]
    if clash:  # lm-eval passes its own --batch_size too, and the constructor would get the key twice
        raise SkipGPTError(f"{', '.join(clash)} is an lm-eval option: give {' '.join('--' + k for k in clash)} "
                           "instead of putting it in --model_args")
    check_model_args(model_args)


if __name__ == "__main__":
    main()
