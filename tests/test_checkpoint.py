"""Atomic checkpoints: commit marker, keep-last-N, resume resolution, crash safety, RNG, distributed save."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from skipgpt_dist.checkpoint import (CheckpointManager, capture_rng_state, find_checkpoint, is_complete,
                                     restore_rng_state, step_dir_name)
from skipgpt_dist.config import TrainConfig, load_config
from skipgpt_dist.errors import SkipGPTError

REPO = Path(__file__).resolve().parents[1]


def write_weights(folder: Path, value: float = 1.0) -> None:
    (folder / "model.json").write_text(json.dumps({"w": value}))


def state(step: int) -> dict:
    return {"data_position": {"epoch": 0, "index": step * 4}, "temperature": 5.0 - step / 100, "tokens_seen": step}


def save(mgr: CheckpointManager, step: int, value: float = 1.0, config=None) -> Path:
    return mgr.save(step, lambda d: write_weights(d, value), state(step), config)


def test_save_writes_marker_config_rng(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_last=2)
    cfg = TrainConfig()
    path = save(mgr, 5, config=cfg)
    assert path == tmp_path / "run" / "checkpoints" / "step_00000005"
    names = {p.name for p in path.iterdir()}
    assert names == {"model.json", "config.yaml", "trainer_state.json", "rng_rank0.safetensors", "rng_rank0.json"}
    loaded = CheckpointManager.load_trainer_state(path)
    assert loaded == {**state(5), "step": 5, "complete": True}
    assert load_config(str(path / "config.yaml")) == cfg
    assert not [p for p in mgr.root.iterdir() if p.name.startswith(".")]


def test_latest_and_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None
    for step in (10, 20, 30):
        save(mgr, step)
    assert mgr.latest().name == step_dir_name(30)
    assert sorted(p.name for p in mgr.root.iterdir()) == [step_dir_name(20), step_dir_name(30)]
    # Saving an older step (resumed from an earlier checkpoint) never deletes the folder just written.
    mgr1 = CheckpointManager(tmp_path, keep_last=1)
    assert save(mgr1, 25).is_dir()
    assert sorted(p.name for p in mgr.root.iterdir()) == [step_dir_name(25), step_dir_name(30)]


def test_latest_ignores_tmp_and_broken(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save(mgr, 1)
    (mgr.root / ".tmp_step_00000009_1").mkdir()
    (mgr.root / "step_00000007").mkdir()  # no marker
    bad = mgr.root / "step_00000008"
    bad.mkdir()
    (bad / "trainer_state.json").write_text("{not json")
    notdone = mgr.root / "step_00000006"
    notdone.mkdir()
    (notdone / "trainer_state.json").write_text(json.dumps({"step": 6, "complete": False}))
    assert mgr.latest().name == step_dir_name(1)
    assert not is_complete(bad) and not is_complete(notdone)
    with pytest.raises(SkipGPTError, match="step_00000008"):
        CheckpointManager.load_trainer_state(bad)


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    assert mgr.resolve_resume("auto") is None
    save(mgr, 3)
    last = save(mgr, 4)
    assert mgr.resolve_resume("never") is None
    assert mgr.resolve_resume("auto") == last
    first = mgr.root / step_dir_name(3)
    assert mgr.resolve_resume(str(first)) == first
    other = CheckpointManager(tmp_path / "other")
    assert other.resolve_resume(str(run)) == last  # a run folder: its latest checkpoint
    assert other.resolve_resume(str(mgr.root)) == last  # its checkpoints/ folder
    with pytest.raises(SkipGPTError, match="checkpoint.resume=.*nope.*does not exist"):
        other.resolve_resume(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SkipGPTError, match="is not a complete checkpoint"):
        other.resolve_resume(str(tmp_path / "empty"))
    with pytest.raises(SkipGPTError, match="stage.init_from"):
        find_checkpoint(tmp_path / "empty", key="stage.init_from")


def test_failing_write_fn_keeps_previous(tmp_path):
    mgr = CheckpointManager(tmp_path)
    good = save(mgr, 10)

    def broken(folder):
        (folder / "partial.bin").write_bytes(b"xx")
        raise ValueError("disk on fire")

    with pytest.raises(ValueError, match="disk on fire"):
        mgr.save(20, broken, state(20))
    assert mgr.latest() == good
    assert [p.name for p in mgr.root.iterdir()] == [good.name]
    with pytest.raises(TypeError):  # trainer state must be JSON: fails before anything is written
        mgr.save(30, write_weights, {"x": object()})
    with pytest.raises(TypeError):  # a failure while committing (here: config not a dataclass) also rolls back
        mgr.save(40, write_weights, {}, config=object())
    assert [p.name for p in mgr.root.iterdir()] == [good.name]


def test_killed_save_keeps_previous_and_next_save_cleans(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from skipgpt_dist.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r})
        mgr.save(10, lambda d: (d / "model.json").write_text("{{}}"), {{"tokens_seen": 10}})
        def slow(d):
            (d / "model.json").write_text("{{partial")
            print("writing", flush=True)
            time.sleep(60)
        mgr.save(20, slow, {{"tokens_seen": 20}})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    mgr = CheckpointManager(tmp_path)
    stale = [p for p in mgr.root.iterdir() if p.name.startswith(".tmp_")]
    assert len(stale) == 1 and (stale[0] / "model.json").exists()
    assert mgr.latest().name == step_dir_name(10)
    assert mgr.load_trainer_state(mgr.latest())["tokens_seen"] == 10
    save(mgr, 20)
    assert sorted(p.name for p in mgr.root.iterdir()) == [step_dir_name(10), step_dir_name(20)]


def test_resave_same_step_replaces(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save(mgr, 10, value=1.0)
    path = save(mgr, 10, value=2.0)
    assert json.loads((path / "model.json").read_text()) == {"w": 2.0}
    assert [p.name for p in mgr.root.iterdir()] == [path.name]


def test_rng_capture_restore(tmp_path):
    np = pytest.importorskip("numpy")
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    snapshot = capture_rng_state()
    expected = (torch.rand(5), random.random(), np.random.rand())
    torch.rand(100), random.random(), np.random.rand()
    restore_rng_state(snapshot)
    assert torch.equal(torch.rand(5), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]

    torch.manual_seed(7)
    path = CheckpointManager(tmp_path).save(1, lambda d: None, {})
    draws = torch.rand(3), random.random()
    torch.manual_seed(99)
    random.seed(99)
    assert CheckpointManager.restore_rng(path, rank=0) is True
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1]
    assert CheckpointManager.restore_rng(path, rank=5) is False


def _dist_worker(rank: int, world: int, init_file: str, run_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)
        mgr = CheckpointManager(run_dir, keep_last=1)
        for step in (1, 2):
            path = mgr.save(step, lambda d: (d / f"shard_{rank}.txt").write_text(str(rank)),
                            {"tokens_seen": step}, TrainConfig())
        expected = torch.rand(2)
        torch.manual_seed(0)
        assert CheckpointManager.restore_rng(path, rank)
        assert torch.equal(torch.rand(2), expected)

        def fail_on_rank1(d):
            if rank == 1:
                raise OSError("rank 1 failed")
        with pytest.raises((OSError, RuntimeError), match="rank 1"):
            mgr.save(3, fail_on_rank1, {})
        dist.barrier()
        assert mgr.latest() == path
    finally:
        dist.destroy_process_group()


def test_distributed_save_gloo(tmp_path):
    import torch.multiprocessing as mp

    run_dir = tmp_path / "run"
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(run_dir)), nprocs=2, join=True)
    mgr = CheckpointManager(run_dir)
    path = mgr.latest()
    assert path.name == step_dir_name(2)
    names = {p.name for p in path.iterdir()}
    assert {"shard_0.txt", "shard_1.txt", "rng_rank0.safetensors", "rng_rank1.safetensors",
            "rng_rank0.json", "rng_rank1.json", "config.yaml", "trainer_state.json"} <= names
    assert [p.name for p in mgr.root.iterdir()] == [path.name]  # keep_last=1, no temp left
