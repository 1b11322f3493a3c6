"""Verified checkpoints (sizes + sha256 in the commit marker), fallback past damaged ones, pruning only after a
newer checkpoint verified, one writer per run folder (run_dir/.lock), and no unpickling of unverified files."""
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_helpers import play_snippets, train
from skipgpt_dist import checkpoint as C
from skipgpt_dist.checkpoint import CheckpointManager, RunLock, step_dir_name, verify_checkpoint
from skipgpt_dist.config import load_config
from skipgpt_dist.errors import SkipGPTError
from skipgpt_dist.training.loop import run

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["optim.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=2", "optim.lr=0.02"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return play_snippets(tmp_path_factory.mktemp("integrity_data"), train_chars=6000, eval_chars=2000)


def overrides(model_dir, data, run_dir, *extra):
    return [f"model.path={model_dir}", f"run_dir={run_dir}", "logging.progress=false", "data.seq_len=32",
            "data.eval_sequences=2", f"data.train_files={json.dumps(data['train'])}",
            f"data.eval_files={json.dumps(data['eval'])}", *extra]


def run_tiny(model_dir, data, run_dir, *extra):
    return run(load_config(str(ROOT / "configs/tiny.yaml"), overrides(model_dir, data, run_dir, *extra)))


def losses(run_dir) -> dict[int, float]:
    """step -> loss; a step logged twice (before a crash and after the resume) keeps its last value."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def step_dirs(run_dir) -> list[str]:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.startswith("step_"))


@pytest.fixture(scope="module")
def whole(tiny_model_dir, data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    run_tiny(tiny_model_dir, data, run_dir, *STEPS)
    return losses(run_dir)


@pytest.fixture(scope="module")
def stopped(tiny_model_dir, data, tmp_path_factory):
    """Stopped at step 6: checkpoints 4 and 6 (keep_last=2), every one verifying."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    assert run_tiny(tiny_model_dir, data, run_dir, *STEPS, "optim.stop_at_step=6").step == 6
    assert step_dirs(run_dir) == [step_dir_name(4), step_dir_name(6)]
    for name in step_dirs(run_dir):
        assert verify_checkpoint(run_dir / "checkpoints" / name) is None
    assert not (run_dir / ".lock").exists(), "the lock is released at a normal exit"
    return run_dir


def damage(folder: Path, how: str) -> str:
    if how == "truncated":
        path = folder / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:-16])
    elif how == "missing":
        path = folder / "optimizer.pt"
        path.unlink()
    else:  # one flipped bit in the RNG state
        path = folder / "rng_rank0.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x01
        path.write_bytes(bytes(raw))
    return path.name


# ---------------------------------------------------------------- manifest and fallback


def test_marker_records_every_file_with_size_and_sha256(stopped):
    folder = stopped / "checkpoints" / step_dir_name(6)
    files = json.loads((folder / "trainer_state.json").read_text())["files"]
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.name != "trainer_state.json")
    assert sorted(files) == on_disk and "optimizer.pt" in files and "rng_rank0.safetensors" in files
    assert files["optimizer.pt"]["size"] == (folder / "optimizer.pt").stat().st_size
    assert "files" not in CheckpointManager.load_trainer_state(folder)
    (folder / "notes.pt").write_bytes(b"x")  # an unrecorded file (e.g. a dropped-in pickle) fails verification
    try:
        assert "notes.pt" in verify_checkpoint(folder)
    finally:
        (folder / "notes.pt").unlink()


@pytest.mark.parametrize("how", ["truncated", "missing", "bitflip"])
def test_auto_resume_falls_back_past_a_damaged_newest_checkpoint(how, stopped, whole, tiny_model_dir, data,
                                                                 tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    name = damage(run_dir / "checkpoints" / step_dir_name(6), how)
    capsys.readouterr()
    result = run_tiny(tiny_model_dir, data, run_dir, *STEPS)
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and step_dir_name(6) in skipped[0] and name in skipped[0], err[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / step_dir_name(4)}" in err
    assert result.step == 8
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(whole[step], abs=1e-6), step
    # the damaged checkpoint was rewritten at step 6, step 4 pruned only after 8 verified
    assert step_dirs(run_dir) == [step_dir_name(6), step_dir_name(8)]
    assert all(verify_checkpoint(run_dir / "checkpoints" / n) is None for n in step_dirs(run_dir))


def test_explicit_damaged_checkpoint_is_a_one_line_error(stopped, tiny_model_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    bad = run_dir / "checkpoints" / step_dir_name(6)
    damage(bad, "bitflip")
    with pytest.raises(SkipGPTError) as err:
        run_tiny(tiny_model_dir, data, run_dir, *STEPS, f"checkpoint.resume={bad}")
    message = str(err.value)
    assert "\n" not in message and "does not verify" in message and "rng_rank0.safetensors" in message
    assert step_dirs(run_dir) == [step_dir_name(4), step_dir_name(6)], "no fallback, nothing written"
    assert not (run_dir / ".lock").exists(), "the lock is released on errors too"


def test_auto_with_no_verifying_checkpoint_is_an_error_not_a_fresh_start(tmp_path, capsys):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    path = mgr.save(3, lambda d: (d / "w.json").write_text("{}"), {})
    (path / "w.json").write_text('{"x": 1}')
    with pytest.raises(SkipGPTError, match="none of the 1 checkpoints"):
        mgr.resolve_resume("auto")
    assert mgr.resolve_resume("never") is None


def test_pruning_never_removes_the_last_verified_checkpoint(tmp_path, monkeypatch, capsys):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save(10, lambda d: (d / "w.json").write_text("10"), {})
    real = C.hash_files

    def wrong_hashes(folder):  # the bytes on disk will not match what the marker records
        files = real(folder)
        files["w.json"]["sha256"] = "0" * 64
        return files

    monkeypatch.setattr(C, "hash_files", wrong_hashes)
    with pytest.raises(SkipGPTError, match="does not verify right after it was written"):
        mgr.save(20, lambda d: (d / "w.json").write_text("20"), {})
    monkeypatch.setattr(C, "hash_files", real)
    assert good.is_dir() and verify_checkpoint(good) is None
    assert mgr.resolve_resume("auto") == good
    assert "skipping" in capsys.readouterr().err
    # a verified newer checkpoint lets the older one go
    mgr.save(30, lambda d: (d / "w.json").write_text("30"), {})
    assert not good.exists()


# ---------------------------------------------------------------- one writer per run folder


def write_lock(run_dir: Path, **info) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": "earlier", **info}))
    return path


def test_a_second_run_on_a_locked_run_dir_is_a_one_line_error(tiny_model_dir, data, tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = write_lock(tmp_path / "run", pid=other.pid)
        with pytest.raises(SkipGPTError) as err:
            run_tiny(tiny_model_dir, data, tmp_path / "run", "optim.max_steps=2")
        message = str(err.value)
        assert "\n" not in message and f"pid {other.pid}" in message and str(lock) in message
        assert lock.exists() and not (tmp_path / "run" / "checkpoints").exists()
    finally:
        other.kill()
        other.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_model_dir, data, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "run", pid=dead.pid)
    assert run_tiny(tiny_model_dir, data, tmp_path / "run", "optim.max_steps=2").step == 2
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not (tmp_path / "run" / ".lock").exists()


def test_lock_rules_for_other_hosts_and_slurm_requeue(tmp_path, monkeypatch, capsys):
    path = write_lock(tmp_path, host="elsewhere-node", pid=123, slurm_job_id="77")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(SkipGPTError, match="in use by another run .*host elsewhere-node.*Slurm job 77"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the requeued job itself, on another node
    lock = RunLock(tmp_path).acquire()
    assert "Slurm job 77" in capsys.readouterr().err
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(SkipGPTError, match=f"pid {os.getpid()}"):  # held by a live process: this one
        RunLock(tmp_path).acquire()
    lock.release()
    assert not path.exists()
    write_lock(tmp_path, host="elsewhere-node", pid=123)  # another host, untouched for longer than the limit
    old = C.STALE_LOCK_AGE_S + 60
    os.utime(path, (path.stat().st_atime - old, path.stat().st_mtime - old))
    monkeypatch.delenv("SLURM_JOB_ID")
    RunLock(tmp_path).acquire().release()
    assert not path.exists()
    RunLock(tmp_path / "new" / "run").acquire().release()  # a run that wrote nothing leaves no empty folders
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- crafted pickles are never unpickled


class Crafted:
    """Unpickling this creates `marker` (builtins.open): proof that a pickle from the checkpoint was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_bytes(marker: Path, torch_format: bool) -> bytes:
    if not torch_format:
        return pickle.dumps(Crafted(marker))
    tmp = marker.with_name(marker.name + ".src")
    torch.save(Crafted(marker), tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def test_crafted_pickle_would_execute_if_read(tmp_path):
    """The test's teeth: read unverified, the crafted files do create the marker."""
    for torch_format in (False, True):
        marker = tmp_path / f"proof_{torch_format}"
        path = tmp_path / f"file_{torch_format}"
        path.write_bytes(crafted_bytes(marker, torch_format))
        if torch_format:
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.exists()


ENGINES = {
    "fsdp2": (["parallel.backend=fsdp2"], "dcp/.metadata", False),
    "deepspeed": (["parallel.backend=deepspeed"], "deepspeed/state/mp_rank_00_model_states.pt", True),
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_crafted_pickle_in_an_engine_checkpoint_is_never_executed(engine, tiny_model_dir, data, tmp_path):
    from skipgpt_dist.export import consolidate

    extra, target, torch_format = ENGINES[engine]
    ds_config = ROOT / "ds_configs" / "zero2.json" if engine == "deepspeed" else None  # ZeRO-2: mp_rank_00_*
    args = [a for a in overrides(tiny_model_dir, data, tmp_path / "run", "optim.max_steps=4",
                                 "checkpoint.every_steps=2", *extra)
            if not a.startswith("run_dir=")]  # train() sets run_dir itself
    first = train(tmp_path / "run", args, launcher="python", nproc=1, ds_config=ds_config,
                  config=ROOT / "configs/tiny.yaml")
    assert first.returncode == 0, first.output[-3000:]
    newest = tmp_path / "run" / "checkpoints" / step_dir_name(4)
    assert (newest / target).is_file() and verify_checkpoint(newest) is None
    marker = tmp_path / "PWNED"
    (newest / target).write_bytes(crafted_bytes(marker, torch_format))

    explicit = train(tmp_path / "run", args + [f"checkpoint.resume={newest}"], launcher="python", nproc=1,
                     ds_config=ds_config, config=ROOT / "configs/tiny.yaml")
    assert explicit.returncode != 0 and not marker.exists()
    errors = explicit.error_lines()
    assert len(errors) == 1 and "does not verify" in errors[0] and target in errors[0], explicit.output[-3000:]
    assert "Traceback" not in explicit.output

    with pytest.raises(SkipGPTError) as err:
        consolidate(newest, tmp_path / "out.safetensors", trainable_only=True)
    assert "\n" not in str(err.value) and "do not verify" in str(err.value) and not marker.exists()

    if engine == "deepspeed":  # (time on 2 cores) the same fallback as FSDP2, checked without the engine
        assert CheckpointManager(tmp_path / "run").resolve_resume("auto") == newest.parent / step_dir_name(2)
        assert not marker.exists()
        return
    fallback = train(tmp_path / "run", args, launcher="python", nproc=1, ds_config=ds_config,
                     config=ROOT / "configs/tiny.yaml")
    assert fallback.returncode == 0, fallback.output[-3000:]
    assert f"skipping {newest}" in fallback.output and f"resumed from {newest.parent / step_dir_name(2)}" in \
        fallback.output
    assert not marker.exists()
    assert verify_checkpoint(newest) is None  # step 4 rewritten by the resumed run

    # Past verification, DCP's own failure (CheckpointException, a BaseException) is still a one-line SkipGPTError.
    from skipgpt_dist.export.dcp_reader import read_dcp_state as _dcp_state

    copy = tmp_path / "dcp_copy"
    shutil.copytree(newest / "dcp", copy)
    for shard in copy.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:8])
    with pytest.raises(SkipGPTError) as err:
        _dcp_state(copy)
    assert "\n" not in str(err.value) and "cannot be read" in str(err.value)
