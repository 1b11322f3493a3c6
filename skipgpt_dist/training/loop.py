"""The one training loop, for both stages and every back end."""
from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointManager, step_dir_name
from ..config import save_config
from ..data import PackedBatches, eval_sequences, pack_files
from ..errors import SkipGPTError
from ..routing import routing_context, set_temperature
from ..routing.api import routing_stats_tensor
from . import distributed as D
from .artifacts import export_artifacts
from .backends import base_loader, make_engine, setup_distributed
from .evaluate import evaluate
from .losses import dense_teacher, distill_loss, global_sparsity_loss, lm_loss
from .model_setup import build_model, describe_trainable
from .warm_start import warm_start_routers
from .reporting import RunReporter, log
from .schedule import temperature

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was saved on a signal; requeue and resume


@dataclass
class RunResult:
    step: int
    preempted: bool
    final_eval: dict | None
    checkpoint: Path | None


class StopSignal:
    """SIGUSR1 / SIGTERM ask the run to checkpoint and stop at the next step boundary (all ranks agree)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        return D.any_rank(self.requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_data(cfg, tokenizer):
    """(train PackedBatches, eval sequences or None); rank 0 tokenises first so `datasets` caches it once."""
    def load(files):
        return pack_files(files, tokenizer, cfg.data.seq_len, cfg.data.format, cfg.data.text_field)

    for turn in (0, 1):
        if (D.rank() == 0) == (turn == 0):
            train = load(cfg.data.train_files)
            held_out = eval_sequences(load(cfg.data.eval_files), None) if cfg.data.eval_files else None
        D.barrier()
    if held_out is not None:
        held_out = held_out[:cfg.data.eval_sequences]
    seed = cfg.data.shuffle_seed if cfg.data.shuffle_seed is not None else cfg.seed
    batches = PackedBatches(train, cfg.optim.micro_batch_size, cfg.optim.grad_accum_steps, D.world_size(),
                            D.rank(), seed)
    return batches, held_out


def train_step(engine, model, micro_batches, cfg, step: int, routers_train: bool) -> dict:
    ctx = routing_context(model)
    ctx.noise_seed, ctx.noise_step = cfg.seed, step
    device = next(p for p in engine.model.parameters()).device
    # Per micro-batch figures stay on the device (no host sync per micro-batch); one transfer per step, after the
    # all-reduce: [lm, sparsity, objective, attn_execute, mlp_execute, per-layer (attn, mlp) execute...].
    sums = None
    distill = cfg.stage.objective == "distill"
    for batch in micro_batches:
        ctx.sample_ids = batch["sample_ids"]
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if distill:
            with dense_teacher(model):
                teacher = engine.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = engine.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        # Under distillation the LM loss is only reported: without a graph its fp32 log-probabilities (tokens x
        # vocab, the largest tensor of the step at a 128k vocabulary) are not held through backward.
        with torch.set_grad_enabled(not distill):
            lm = lm_loss(logits, ids, mask)
        objective = distill_loss(logits, teacher, mask) if distill else lm
        loss, sparsity_value = objective, torch.zeros((), device=lm.device)
        if routers_train:
            surrogate, sparsity_value = global_sparsity_loss(model)
            loss = objective + surrogate
        engine.backward(loss)
        losses = torch.stack([lm.detach(), sparsity_value.detach().to(lm.device), objective.detach()]).double()
        row = torch.cat([losses, routing_stats_tensor(model).to(lm.device)])
        sums = row if sums is None else sums + row
    # Ranks hold equal token counts, so the global figures are plain means over ranks.
    reduced = D.all_reduce_sum(sums / len(micro_batches)) / D.world_size()
    info = engine.step()
    return step_metrics(reduced.tolist(), info, distill)  # the step's one device-to-host transfer of metrics


def step_metrics(reduced: list[float], info: dict, distill: bool) -> dict:
    """The step's report from train_step's reduced row (see there for its layout)."""
    lm_value, sparsity_value, objective_value, attn, mlp = reduced[:5]
    skipped = [1.0 - v for v in reduced[5:]]
    out = {"loss": objective_value + sparsity_value, "lm_loss": lm_value, "sparsity_loss": sparsity_value,
           "attn_sparsity": 1 - attn, "mlp_sparsity": 1 - mlp,
           "layers": [skipped[i:i + 2] for i in range(0, len(skipped), 2)], **info}
    if distill:
        out["distill_loss"] = objective_value
    return out


def fault_injection(step: int):
    """Test hook: SKIPGPT_FAULT=kill_in_save@STEP kills the process inside that step's checkpoint write."""
    spec = os.environ.get("SKIPGPT_FAULT", "")
    if spec == f"kill_in_save@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(ckpts, engine, model, cfg, step, batches, reporter_tokens) -> Path:
    ctx = routing_context(model)

    def write(folder: Path):
        engine.save(folder)
        export_artifacts(engine, model, folder)
        fault_injection(step)

    state = {"step": step, "data_position": batches.state_dict(), "temperature": ctx.temperature,
             "tokens_seen": reporter_tokens, "stage": cfg.stage.stage, "world_size": D.world_size(),
             "backend": cfg.parallel.backend}
    path = ckpts.save(step, write, state, cfg)
    log(f"saved checkpoint {path}")
    return path


def resume(ckpts, engine, cfg, batches) -> int:
    path = ckpts.resolve_resume(cfg.checkpoint.resume)
    if path is None:
        return 0
    state = ckpts.load_trainer_state(path)
    if state.get("stage") not in (None, cfg.stage.stage):
        raise SkipGPTError(f"checkpoint {path} is from stage {state.get('stage')}, this run is stage "
                           f"{cfg.stage.stage}: use another run_dir or checkpoint.resume=never")
    written = state.get("backend", cfg.parallel.backend)
    if written != cfg.parallel.backend:  # each back end has its own checkpoint format (DeepSpeed, DCP, safetensors)
        ranks = {"deepspeed": f" on {state.get('world_size')} ranks", "fsdp2": " (any number of ranks)"}
        raise SkipGPTError(f"checkpoint {path} was written by parallel.backend={written}, this run uses "
                           f"{cfg.parallel.backend}: resume it with parallel.backend={written}"
                           f"{ranks.get(written, '')}, export it with tools/consolidate.py, or start fresh with "
                           "checkpoint.resume=never")
    engine.load(path)
    batches.load_state_dict(state["data_position"])
    ckpts.restore_rng(path, D.rank())
    log(f"resumed from {path} at step {state['step']}")
    return int(state["step"])


def run(cfg) -> RunResult:
    """Train one stage as configured. Every input is checked before the run folder is touched."""
    setup_distributed(cfg)
    seed_everything(cfg.seed)
    model, tokenizer, model_dir = build_model(cfg, load_base=base_loader(cfg))
    batches, held_out = build_data(cfg, tokenizer)
    warm_start_routers(cfg, model, batches)
    engine = make_engine(cfg, model)
    ckpts = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep_last)
    step = resume(ckpts, engine, cfg, batches)
    if D.is_main():
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run_dir) / "config.yaml")
        tokenizer.save_pretrained(Path(cfg.run_dir) / "tokenizer")
    D.barrier()
    log(f"stage {cfg.stage.stage} on {model_dir}: {describe_trainable(model)}; backend {engine.name}, "
        f"world size {D.world_size()}, global batch {cfg.global_batch_size(D.world_size())} x {cfg.data.seq_len}")
    return train_from(step, cfg, engine, model, batches, held_out, ckpts)


def train_from(step, cfg, engine, model, batches, held_out, ckpts) -> RunResult:
    routers_train = cfg.stage.stage == 1 or cfg.stage.train_routers
    tokens_per_step = cfg.global_batch_size(D.world_size()) * cfg.data.seq_len
    reporter = RunReporter(cfg, step, tokens_per_step)
    stopper, stop_at = StopSignal(), cfg.optim.stop_at_step or cfg.optim.max_steps
    engine.model.train()
    last_saved, preempted, final_eval, start = None, False, None, step
    r = cfg.routers
    while step < min(stop_at, cfg.optim.max_steps):
        if routers_train:
            set_temperature(model, temperature(step, cfg.optim.max_steps, r.temperature_start, r.temperature_end))
        started = time.time()
        metrics = train_step(engine, model, batches.next_step(), cfg, step, routers_train)
        step += 1
        metrics.update(temperature=routing_context(model).temperature,
                       tokens_per_s=tokens_per_step / max(time.time() - started, 1e-9))
        reporter.step(step, metrics)
        preempted = stopper.agreed()
        every = cfg.checkpoint.every_steps
        if preempted or (every and step % every == 0):
            last_saved = save_checkpoint(ckpts, engine, model, cfg, step, batches, step * tokens_per_step)
        if preempted:
            log(f"stop signal received: checkpoint saved at step {step}; exiting for requeue")
            break
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and held_out is not None:
            reporter.eval(step, evaluate(engine.model, held_out, cfg.optim.micro_batch_size))
    if not preempted and step > start and (last_saved is None or last_saved.name != step_dir_name(step)):
        last_saved = save_checkpoint(ckpts, engine, model, cfg, step, batches, step * tokens_per_step)
    if not preempted and step >= cfg.optim.max_steps and cfg.eval.at_end and held_out is not None:
        final_eval = evaluate(engine.model, held_out, cfg.optim.micro_batch_size)
        reporter.eval(step, final_eval)
        if D.is_main():
            (Path(cfg.run_dir) / "final_eval.json").write_text(json.dumps(final_eval, indent=2) + "\n")
    reporter.close()
    return RunResult(step=step, preempted=preempted, final_eval=final_eval, checkpoint=last_saved)
