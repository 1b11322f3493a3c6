"""Robustness (issue #17): non-finite steps are skipped, counted and bounded; no NaN ever reaches a checkpoint or
metrics.jsonl; broken inputs and failed writes are one `error:` line with exit code 2, never a traceback.

NaN steps come from the test hook SKIPGPT_FAULT=nan_loss@STEP[-LAST][:rank=R] (training/loop.py nan_fault): a
huge optim.lr does not reliably produce NaN on the tiny model (Adam normalises the step), the hook does.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import REPO, child_env, play_snippets, train, zero3_all_sharded  # noqa: E402

from skipgpt_dist.config import check_run_dir, load_config  # noqa: E402
from skipgpt_dist.errors import SkipGPTError  # noqa: E402
from skipgpt_dist.training.loop import run  # noqa: E402
from skipgpt_dist.training.reporting import RunReporter, json_line, truncate_metrics  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"


def strict_json(line: str):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def records(run_dir) -> list[dict]:
    return [strict_json(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return play_snippets(tmp_path_factory.mktemp("fault_text"), train_chars=8000, eval_chars=3000)


def overrides(model_dir, files, run_dir, *extra):
    return [f"model.path={model_dir}", f"run_dir={run_dir}", "logging.progress=false", "data.seq_len=32",
            f"data.train_files={json.dumps(files['train'])}", "data.eval_files=[]", "optim.warmup_steps=1",
            "checkpoint.every_steps=0", *extra]


def cli(script, *args, env=None, timeout=300):
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=child_env(env))
    return proc


def assert_one_line_error(proc, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- metrics.jsonl


def reporter_cfg(run_dir):
    return SimpleNamespace(run_dir=str(run_dir), logging=SimpleNamespace(progress=False, wandb=False, every_steps=1),
                           optim=SimpleNamespace(max_steps=10), stage=SimpleNamespace(stage=1))


def test_metrics_are_strict_json_with_null_for_non_finite(tmp_path):
    reporter = RunReporter(reporter_cfg(tmp_path), 0, 1)
    metrics = {"loss": float("nan"), "lm_loss": float("inf"), "sparsity_loss": 0.5, "attn_sparsity": 0.1,
               "mlp_sparsity": 0.2, "grad_norm": float("-inf"), "lr": 1e-3, "temperature": 1.0,
               "tokens_per_s": 10.0, "skipped": True, "bad_steps": 1, "layers": [[float("nan"), 0.5]]}
    reporter.step(1, metrics)
    reporter.eval(1, {"ppl_routed": float("inf")})
    reporter.close()
    step, evaluation = records(tmp_path)
    assert step["loss"] is None and step["lm_loss"] is None and step["grad_norm"] is None
    assert step["layers"] == [[None, 0.5]] and step["skipped"] is True and step["sparsity_loss"] == 0.5
    assert evaluation == {"step": 1, "eval": {"ppl_routed": None}}
    assert json_line({"a": [1.0, float("nan")]}) == '{"a": [1.0, null]}'


def test_resume_truncates_the_records_of_re_run_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 9)] + [json.dumps({"step": 4, "eval": {}})]
    path.write_text("\n".join(lines) + "\n" + '{"step": 9, "lo')  # torn by a kill mid-write
    RunReporter(reporter_cfg(tmp_path), 4, 1).close()
    assert [(r["step"], "eval" in r) for r in records(tmp_path)] == [(1, False), (2, False), (3, False),
                                                                    (4, False), (4, True)]
    assert not list(tmp_path.glob(".metrics.jsonl.tmp*"))
    truncate_metrics(path, 0)  # a fresh start in an old folder keeps nothing
    assert path.read_text() == ""


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("key,value,needle", [("optim.lr", "1e39", "overflows fp32"),
                                              ("optim.lr", "inf", "finite"),
                                              ("optim.max_bad_steps", "0", ">= 1")])
def test_optim_values_that_cannot_train_are_rejected(key, value, needle):
    with pytest.raises(SkipGPTError, match=needle):
        load_config(str(TINY), [f"{key}={value}"])
    assert load_config(str(TINY), []).optim.max_bad_steps == 5


def test_run_dir_must_be_a_writable_folder(tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SkipGPTError, match="is a file"):
        check_run_dir(str(a_file))
    with pytest.raises(SkipGPTError, match="is a file"):
        check_run_dir(str(a_file / "run"))
    check_run_dir(str(tmp_path / "new" / "run"))  # created later, inside a writable folder
    # Read-only (root bypasses chmod, so simulate what access(2) says for a read-only mount or folder).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(SkipGPTError, match="not writable"):
        check_run_dir(str(tmp_path / "run"))


def test_run_dir_that_is_a_file_is_one_line(tiny_model_dir, files, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    proc = cli("train.py", "--config", TINY, *overrides(tiny_model_dir, files, a_file, "optim.max_steps=1"))
    assert_one_line_error(proc, "run_dir=", "is a file")
    assert a_file.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir_is_one_line(tiny_model_dir, files, tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        proc = cli("train.py", "--config", TINY, *overrides(tiny_model_dir, files, read_only / "run",
                                                           "optim.max_steps=1"))
    finally:
        read_only.chmod(0o755)
    assert_one_line_error(proc, "not writable")


# ---------------------------------------------------------------- non-finite steps


def test_nan_steps_are_skipped_counted_and_stop_the_run(tiny_model_dir, files, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("train.py", "--config", TINY,
               *overrides(tiny_model_dir, files, run_dir, "optim.max_steps=12", "checkpoint.every_steps=4",
                          "checkpoint.keep_last=1", "optim.max_bad_steps=3"),
               env={"SKIPGPT_FAULT": "nan_loss@2,nan_loss@6-20"})
    line = assert_one_line_error(proc, "3 optimiser steps in a row (steps 6-8)", "optim.max_bad_steps=3")
    assert "step_00000004" in line  # the run stops at step 8 before its checkpoint: step 4 is the newest
    rows = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["skipped"] for r in rows] == [False, True, False, False, False, True, True, True]
    assert [r["bad_steps"] for r in rows] == [0, 1, 0, 0, 0, 1, 2, 3]
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None and rows[1]["lr"] > 0
    assert rows[-1]["skipped_steps"] == 4
    # The schedule still advanced on skipped steps (cosine after a 1-step warmup: strictly falling).
    lrs = [r["lr"] for r in rows[1:]]
    assert all(a > b for a, b in zip(lrs, lrs[1:])), lrs
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_00000004"]  # written after the skipped step 2
    for tensor in load_file(str(checkpoints[0] / "trainable.safetensors")).values():
        assert torch.isfinite(tensor).all()


def test_a_skipped_step_leaves_parameters_and_optimiser_state_untouched(tiny_model_dir, files, tmp_path,
                                                                        monkeypatch):
    """3 steps with step 3 skipped == the same run stopped after 2 steps (weights, Adam moments and step count);
    only the LR schedule moved on."""
    def final(run_dir, steps, fault=""):  # schedules (LR, temperature) span 3 steps in both runs
        monkeypatch.setenv("SKIPGPT_FAULT", fault)
        result = run(load_config(str(TINY), overrides(tiny_model_dir, files, run_dir, "optim.max_steps=3",
                                                      f"optim.stop_at_step={steps}", "eval.at_end=false")))
        folder = result.checkpoint
        return load_file(str(folder / "trainable.safetensors")), torch.load(folder / "optimizer.pt",
                                                                            weights_only=True)

    skipped_w, skipped_opt = final(tmp_path / "skipped", 3, "nan_loss@3")
    clean_w, clean_opt = final(tmp_path / "clean", 2)
    assert skipped_w.keys() == clean_w.keys()
    for name in clean_w:
        assert torch.equal(skipped_w[name], clean_w[name]), name
    for index, state in clean_opt["optimizer"]["state"].items():
        other = skipped_opt["optimizer"]["state"][index]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(other[key], state[key]), (index, key)
    assert skipped_opt["scheduler"]["last_epoch"] == clean_opt["scheduler"]["last_epoch"] + 1


def test_a_non_finite_parameter_is_never_checkpointed(tiny_model_dir, files, tmp_path):
    from skipgpt_dist.training import loop

    run_dir = tmp_path / "run"
    cfg = load_config(str(TINY), overrides(tiny_model_dir, files, run_dir, "optim.max_steps=4",
                                           "checkpoint.every_steps=2", "eval.at_end=false"))
    real_step = loop.train_step

    def corrupting_step(engine, model, micro_batches, cfg, step, routers_train):
        out = real_step(engine, model, micro_batches, cfg, step, routers_train)
        if step == 2:  # after the update of step 3: as an engine that applied a NaN update would leave it
            with torch.no_grad():
                next(p for p in engine.model.parameters() if p.requires_grad).fill_(float("nan"))
        return out

    loop.train_step = corrupting_step
    try:
        with pytest.raises(SkipGPTError, match="not finite at step 4.*step_00000002"):
            run(cfg)
    finally:
        loop.train_step = real_step
    assert [c.name for c in (run_dir / "checkpoints").glob("step_*")] == ["step_00000002"]


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous(tiny_model_dir, files, tmp_path,
                                                                          monkeypatch):
    from skipgpt_dist.training import loop

    run_dir = tmp_path / "run"
    cfg = load_config(str(TINY), overrides(tiny_model_dir, files, run_dir, "optim.max_steps=4",
                                           "checkpoint.every_steps=2", "eval.at_end=false"))
    real_export, calls = loop.export_artifacts, []

    def export_then_fill_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_export(*args, **kwargs)

    monkeypatch.setattr(loop, "export_artifacts", export_then_fill_the_disk)
    with pytest.raises(SkipGPTError) as err:
        run(cfg)
    message = str(err.value)
    assert "checkpoint step 4" in message and "No space left on device" in message and "step_00000002" in message
    assert "\n" not in message
    checkpoints = run_dir / "checkpoints"
    assert [c.name for c in checkpoints.iterdir()] == ["step_00000002"]  # no temp folder left either
    assert (checkpoints / "step_00000002" / "trainer_state.json").is_file()


def test_kill_and_resume_leaves_no_duplicate_records(tiny_model_dir, files, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", TINY, *overrides(tiny_model_dir, files, run_dir, "optim.max_steps=6",
                                         "checkpoint.every_steps=2")]
    killed = cli("train.py", *args, env={"SKIPGPT_FAULT": "kill_in_save@4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3, 4]
    finished = cli("train.py", *args)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- broken model files and tool arguments


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("broken_models")
    out = {}
    for name in ("truncated", "garbage", "bad_config"):
        out[name] = root / name
        shutil.copytree(tiny_model_dir, out[name])
    weights = (out["truncated"] / "model.safetensors").read_bytes()
    (out["truncated"] / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    (out["garbage"] / "model.safetensors").write_bytes(os.urandom(4096))
    (out["bad_config"] / "config.json").write_text('{"model_type": "llama", ')
    return out


@pytest.mark.parametrize("case,needle", [("truncated", "not a readable safetensors file"), ("garbage", "safetensors"),
                                         ("bad_config", "config.json is not valid JSON")])
@pytest.mark.parametrize("backend", ["none", "fsdp2"])
def test_broken_model_folder_is_one_line(broken_models, files, tmp_path, case, needle, backend):
    if backend == "fsdp2" and case == "bad_config":
        pytest.skip("config.json is read before the back end matters")
    proc = cli("train.py", "--config", TINY, *overrides(broken_models[case], files, tmp_path / "run",
                                                       "optim.max_steps=1", f"parallel.backend={backend}"))
    assert_one_line_error(proc, "model.path=", needle)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(load_config(str(TINY), overrides(tiny_model_dir, files, run_dir, "optim.max_steps=1",
                                         "eval.at_end=false")))
    return run_dir


def corrupt_copy(run_dir, tmp_path, name="routers.safetensors"):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    target = sorted((copy / "checkpoints").glob("step_*"))[-1] / name
    target.write_bytes(target.read_bytes()[:40])
    return copy


def test_corrupt_stage1_routers_in_init_from_is_one_line(trained, files, tiny_model_dir, tmp_path):
    stage1 = corrupt_copy(trained, tmp_path)
    proc = cli("train.py", "--config", REPO / "configs" / "tiny_stage2.yaml",
               *overrides(tiny_model_dir, files, tmp_path / "s2", "optim.max_steps=1", f"stage.init_from={stage1}"))
    assert_one_line_error(proc, "routers.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("tool,extra", [("tools/eval_ppl.py", ["--data", "DATA", "--sequences", "2"]),
                                        ("tools/routing_report.py", ["--text", "To be", "--out", "OUT"])])
def test_tools_report_corrupt_checkpoints_in_one_line(trained, files, tmp_path, tool, extra):
    copy = corrupt_copy(trained, tmp_path)
    args = [a.replace("DATA", files["eval"][0]).replace("OUT", str(tmp_path / "out")) for a in extra]
    assert_one_line_error(cli(tool, copy, *args), "routers.safetensors")


@pytest.mark.parametrize("args,needle", [(["--batch-size", "0"], "--batch-size=0 must be >= 1"),
                                         (["--batch-size", "-3"], "--batch-size=-3"),
                                         (["--seq-len", "1"], "--seq-len=1 must be >= 2"),
                                         (["--sequences", "0"], "--sequences=0")])
def test_eval_ppl_rejects_arguments_that_cannot_score(trained, args, needle):
    assert_one_line_error(cli("tools/eval_ppl.py", trained, *args), needle)


# ---------------------------------------------------------------- two ranks agree to skip


@pytest.fixture(scope="module")
def nan_reference(tiny_model_dir, files, tmp_path_factory):
    """One process with a NaN loss at step 2 (the run every back end's two ranks must equal): (overrides, run)."""
    run_dir = tmp_path_factory.mktemp("nan_ref")
    common = overrides(tiny_model_dir, files, run_dir, "optim.max_steps=4", "optim.grad_accum_steps=2",
                       "routers.mode=capacity", "routers.capacity=1.0", "seed=3", "eval.at_end=false")[2:]
    ref = train(run_dir, common + ["optim.micro_batch_size=4"], launcher="python", nproc=1, config=TINY,
                env={"SKIPGPT_FAULT": "nan_loss@2"})
    return common, ref


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero2", "zero3", "fsdp2"])
def test_nan_on_one_rank_is_skipped_by_every_rank(nan_reference, tmp_path, backend):
    """A NaN loss on rank 1 only: both ranks skip the step, and the run equals one process that skipped it."""
    common, ref = nan_reference
    extra = {"zero2": dict(ds_config=REPO / "ds_configs" / "zero2.json", launcher="deepspeed"),
             "zero3": dict(ds_config=zero3_all_sharded(tmp_path)), "fsdp2": {}}[backend]
    per_rank = common + ["optim.micro_batch_size=2"] + (["parallel.backend=fsdp2"] if backend == "fsdp2" else [])
    dist = train(tmp_path / backend, per_rank, config=TINY, env={"SKIPGPT_FAULT": "nan_loss@2:rank=1"}, **extra)
    for result in (ref, dist):
        assert result.returncode == 0, result.output[-4000:]
    got, want = dist.metrics(), ref.metrics()
    assert [r["skipped"] for r in got] == [r["skipped"] for r in want] == [False, True, False, False]
    for a, b in zip(got, want):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        for key in ("loss", "lm_loss"):
            if b[key] is None:
                assert a[key] is None
            else:
                assert a[key] == pytest.approx(b[key], abs=1e-4), (key, got, want)
