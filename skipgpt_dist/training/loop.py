"""The one training loop, for both stages and every back end."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointManager, acquire_run_lock, step_dir_name
from ..config import save_config
from ..data import PackedBatches, eval_sequences, pack_files
from ..errors import SkipGPTError
from ..file_names import CONFIG_FILE
from ..routing import routing_context, set_temperature
from ..routing.api import routing_stats_tensor
from . import distributed as D
from .artifacts import export_artifacts
from .backends import base_loader, make_engine, setup_distributed
from .evaluate import evaluate
from .losses import dense_teacher, distill_loss, global_sparsity_loss, lm_loss
from .model_setup import build_model, describe_trainable
from .portable import PORTABLE_DIR, portable_reason
from .warm_start import calibrate_stage2, restore_warm_start, warm_start_routers
from .reporting import RunReporter, finite_or_none, log
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
    """(train PackedBatches, eval sequences or None).

    Token shards (a folder from tools/prepare_data.py) are opened lazily on every rank, no collective. Raw files:
    rank 0 tokenises first so `datasets` caches it once, the others wait at a barrier, then read the cache."""
    from ..token_shards import cached_shards, shard_folder

    d = cfg.data
    eval_format = "auto" if d.format == "shards" else d.format  # data.format=shards names the training data

    # Several ranks: raw files become shards first, so no rank waits in a collective (an NCCL watchdog kills a
    # barrier after 10 minutes) while another tokenises a big corpus.
    cache = d.cache_shards if d.cache_shards is not None else D.world_size() > 1

    def load(files, fmt, key):
        if cache and shard_folder(files, fmt, key) is None:  # raw files -> shards in the run's cache
            local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
            files = [cached_shards(files, os.path.join(cfg.run_dir, "data_cache"), tokenizer, fmt, d.text_field,
                                   key, local_rank=local, num_proc=max(1, min(16, (os.cpu_count() or 2) - 1)),
                                   progress=cfg.logging.progress and local == 0)]
        return pack_files(files, tokenizer, d.seq_len, fmt, d.text_field, key)

    def load_all():
        train = load(d.train_files, d.format, "data.train_files")
        if not d.eval_files:
            return train, None
        packed = load(d.eval_files, eval_format, "data.eval_files")
        return train, eval_sequences(packed, min(len(packed), d.eval_sequences))

    sharded = cache or shard_folder(d.train_files, d.format, "data.train_files") is not None and (
        not d.eval_files or shard_folder(d.eval_files, eval_format, "data.eval_files") is not None)
    if sharded:
        train, held_out = load_all()
    else:
        for turn in (0, 1):
            if (D.rank() == 0) == (turn == 0):
                train, held_out = load_all()
            D.barrier()
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
    poisoned = nan_fault(step + 1)
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
        if poisoned:  # test hook SKIPGPT_FAULT=nan_loss@STEP: a NaN objective, as an lr too high would give
            objective, poisoned = objective * float("nan"), False
        loss, sparsity_value = objective, torch.zeros((), device=lm.device)
        if routers_train:
            surrogate, sparsity_value = global_sparsity_loss(model)
            loss = objective + surrogate
        engine.backward(loss)
        losses = torch.stack([lm.detach(), sparsity_value.detach().to(lm.device), objective.detach()]).double()
        nonfinite = (~torch.isfinite(loss.detach())).reshape(1).double()
        row = torch.cat([losses, routing_stats_tensor(model).to(lm.device), nonfinite.to(lm.device)])
        sums = row if sums is None else sums + row
    # Ranks hold equal token counts, so the global figures are plain means over ranks. The last entry is the
    # non-finite-loss flag: after the sum it is > 0 on every rank when any rank's loss was NaN/inf, so all ranks
    # agree to skip without a collective of their own.
    reduced = D.all_reduce_sum(sums / len(micro_batches)) / D.world_size()
    values = reduced.tolist()  # the step's one device-to-host transfer of metrics, before the update it decides
    bad_loss = values.pop() > 0
    info = engine.skip_step() if bad_loss else engine.step()  # a non-finite grad norm: the engine skips itself
    out = step_metrics(values, info, distill)
    out["skipped"] = bool(info.get("skipped"))
    return out


def nan_fault(step: int) -> bool:
    """Test hook: SKIPGPT_FAULT=nan_loss@STEP (or nan_loss@FIRST-LAST, or ...:rank=R for one rank only; several
    specs comma-separated) makes that 1-based step's loss NaN."""
    for spec in os.environ.get("SKIPGPT_FAULT", "").split(","):
        if not spec.startswith("nan_loss@"):
            continue
        steps, _, only = spec[len("nan_loss@"):].partition(":rank=")
        first, _, last = steps.partition("-")
        if int(first) <= step <= int(last or first) and (not only or int(only) == D.rank()):
            return True
    return False


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
        engine.save_portable(folder / PORTABLE_DIR)  # issue #17: resumable on any back end / world size / stage
        export_artifacts(engine, model, folder)
        fault_injection(step)

    state = {"step": step, "data_position": batches.state_dict(), "temperature": ctx.temperature,
             "tokens_seen": reporter_tokens, "stage": cfg.stage.stage, "world_size": D.world_size(),
             "backend": cfg.parallel.backend}
    path = ckpts.save(step, write, state, cfg)
    log(f"saved checkpoint {path}")
    return path


def resume(ckpts, engine, cfg, batches) -> int:
    path = ckpts.resolve_resume(cfg.checkpoint.resume, log)  # verified (file sizes + sha256) before any read
    if path is None:
        return 0
    state = ckpts.load_trainer_state(path)
    if state.get("stage") not in (None, cfg.stage.stage):
        raise SkipGPTError(f"checkpoint {path} is from stage {state.get('stage')}, this run is stage "
                           f"{cfg.stage.stage}: use another run_dir or checkpoint.resume=never")
    # issue #17: the engine's native format where it can load the checkpoint; another back end, world size (for
    # DeepSpeed) or ZeRO stage resumes from the portable state (training/portable.py; an error if it has none).
    portable = portable_reason(Path(path), state, engine, cfg)
    if portable is None:
        engine.load(path)
    else:
        log(f"resuming {path} from its portable state ({PORTABLE_DIR}/): {portable}")
        engine.load_portable(Path(path) / PORTABLE_DIR)
    restore_warm_start(cfg, engine.model, Path(path))
    batches.load_state_dict(state["data_position"])
    ckpts.restore_rng(path, D.rank())
    log(f"resumed from {path} at step {state['step']}")
    return int(state["step"])


def run(cfg) -> RunResult:
    """Train one stage as configured. Every input is checked before the run folder is touched."""
    setup_distributed(cfg)
    seed_everything(cfg.seed)
    model, tokenizer, model_dir = build_model(cfg, load_base=base_loader(cfg))  # checks run_dir is writable
    # One writer per run folder: rank 0 takes run_dir/.lock before anything is written there (the data cache
    # included); released on every exit, and a run folder it had to create is removed again if left empty.
    lock = acquire_run_lock(cfg.run_dir, log)
    try:
        batches, held_out = build_data(cfg, tokenizer)
        engine = make_engine(cfg, model)
        ckpts = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep_last)
        step = resume(ckpts, engine, cfg, batches)
        if D.is_main():
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.run_dir) / CONFIG_FILE)
            tokenizer.save_pretrained(Path(cfg.run_dir) / "tokenizer")
        D.barrier()
        # A fresh run shapes its routers on the engine's (sharded) model, on every rank; a resumed one has them,
        # and its capacity plan, from the checkpoint.
        if step == 0:
            warm_start_routers(cfg, engine, batches)
            calibrate_stage2(cfg, engine, batches)
        log(f"stage {cfg.stage.stage} on {model_dir}: {describe_trainable(model)}; backend {engine.name}, "
            f"world size {D.world_size()}, global batch {cfg.global_batch_size(D.world_size())} x "
            f"{cfg.data.seq_len}")
        return train_from(step, cfg, engine, model, batches, held_out, ckpts)
    finally:
        lock.release()


def train_from(step, cfg, engine, model, batches, held_out, ckpts) -> RunResult:
    routers_train = cfg.stage.stage == 1 or cfg.stage.train_routers
    tokens_per_step = cfg.global_batch_size(D.world_size()) * cfg.data.seq_len
    reporter = RunReporter(cfg, step, tokens_per_step)
    stopper, stop_at = StopSignal(), cfg.optim.stop_at_step or cfg.optim.max_steps
    engine.model.train()
    last_saved, preempted, final_eval, start = None, False, None, step
    bad_run, skipped_total = 0, 0  # non-finite steps in a row / in this process
    r = cfg.routers

    def checkpoint(at: int) -> Path:
        return guarded_save(ckpts, engine, model, cfg, at, batches, at * tokens_per_step)

    try:
        while step < min(stop_at, cfg.optim.max_steps):
            if routers_train:
                set_temperature(model, temperature(step, cfg.optim.max_steps, r.temperature_start,
                                                   r.temperature_end))
            started = time.time()
            metrics = train_step(engine, model, batches.next_step(), cfg, step, routers_train)
            step += 1
            bad = metrics["skipped"] or not math.isfinite(metrics["grad_norm"])
            bad_run, skipped_total = (bad_run + 1 if bad else 0), skipped_total + bad
            metrics.update(temperature=routing_context(model).temperature, bad_steps=bad_run,
                           skipped_steps=skipped_total,
                           tokens_per_s=tokens_per_step / max(time.time() - started, 1e-9))
            reporter.step(step, metrics)
            if bad:
                log(f"step {step}: non-finite loss or gradient norm (loss {metrics['loss']:.4g}, grad norm "
                    f"{metrics['grad_norm']:.4g}): update skipped, {bad_run} in a row "
                    f"(optim.max_bad_steps={cfg.optim.max_bad_steps})")
                if bad_run >= cfg.optim.max_bad_steps:
                    newest = ckpts.latest()
                    raise SkipGPTError(
                        f"{bad_run} optimiser steps in a row (steps {step - bad_run + 1}-{step}) had a non-finite "
                        f"loss or gradient norm and were skipped (optim.max_bad_steps={cfg.optim.max_bad_steps}): "
                        f"lower optim.lr or check the data and model; "
                        + (f"the newest checkpoint {newest} is intact" if newest else "no checkpoint was written"))
            preempted = stopper.agreed()
            every = cfg.checkpoint.every_steps
            if preempted or (every and step % every == 0):
                last_saved = checkpoint(step)
            if preempted:
                log(f"stop signal received: checkpoint saved at step {step}; exiting for requeue")
                break
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and held_out is not None:
                reporter.eval(step, evaluate(engine.model, held_out, cfg.optim.micro_batch_size))
        if not preempted and step > start and (last_saved is None or last_saved.name != step_dir_name(step)):
            last_saved = checkpoint(step)
        if not preempted and step >= cfg.optim.max_steps and cfg.eval.at_end and held_out is not None:
            final_eval = evaluate(engine.model, held_out, cfg.optim.micro_batch_size)
            reporter.eval(step, final_eval)
            if D.is_main():
                (Path(cfg.run_dir) / "final_eval.json").write_text(
                    json.dumps(finite_or_none(final_eval), indent=2, allow_nan=False) + "\n")
    finally:
        reporter.close()
    return RunResult(step=step, preempted=preempted, final_eval=final_eval, checkpoint=last_saved)


def nonfinite_trainable(engine) -> str | None:
    """None when every trainable tensor is finite on every rank; else the name of a non-finite one on this rank
    ("" if only another rank holds one). Checks each rank's own shard (ZeRO-3 partition, FSDP2 DTensor shard): one
    host read and one collective. Called on every rank."""
    named = []
    for name, param in engine.model.named_parameters():
        if param.requires_grad:  # ZeRO-3: this rank's partition; FSDP2 (a DTensor): this rank's shard
            local = param.ds_tensor if hasattr(param, "ds_tensor") else (
                param.to_local() if hasattr(param, "to_local") else param)
            if local.numel():
                named.append((name, local.detach()))
    flags = torch.stack([~torch.isfinite(t).all() for _, t in named]) if named else torch.zeros(1, dtype=torch.bool)
    flags = flags.cpu()
    if not D.any_rank(bool(flags.any())):
        return None
    return next((name for (name, _), flag in zip(named, flags.tolist()) if flag), "")


def guarded_save(ckpts, engine, model, cfg, step, batches, tokens) -> Path:
    """save_checkpoint, but never of a non-finite trainable tensor, and with a failed write (disk full, permissions)
    as one line that says the previous checkpoint is intact. Every rank calls this."""
    bad = nonfinite_trainable(engine)
    if bad is not None:
        where = f" ({bad} on rank {D.rank()})" if bad else ""
        raise SkipGPTError(f"a trainable tensor is not finite at step {step}{where}: checkpoint not written, the "
                           f"newest one ({ckpts.latest() or 'none'}) is intact; lower optim.lr and resume from it")
    try:
        return save_checkpoint(ckpts, engine, model, cfg, step, batches, tokens)
    except OSError as err:
        reason = f"{type(err).__name__}: {err.strerror or err}"
        raise SkipGPTError(f"checkpoint step {step} could not be written in {ckpts.root} ({reason}): free disk space "
                           f"or fix the folder's permissions, then resume; the previous checkpoint "
                           f"({ckpts.latest() or 'none'}) is intact") from None
    except RuntimeError as err:  # another rank's write failed (CheckpointManager.save tells every rank)
        if not str(err).startswith(f"checkpoint step {step} was not saved"):
            raise
        raise SkipGPTError(f"{str(err).splitlines()[0]}: free disk space or fix the folder's permissions, then "
                           "resume") from None
