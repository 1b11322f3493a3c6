"""Helpers for the multi-process tests and bench/dist_step.py: launch train.py under torchrun / the deepspeed
launcher / plain python, read back metrics.jsonl and the per-rank "holds N of M parameter elements" lines."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELD_RE = re.compile(r"\[skipgpt rank (\d+)/(\d+)\] (\w+) holds (\d+) of (\d+) parameter elements"
                     r"(?: \(launcher: (\w+)\))?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def launch_cmd(launcher: str, nproc: int) -> list[str]:
    """The command prefix that starts `nproc` processes of train.py."""
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, "train.py"]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                "train.py"]
    if launcher == "deepspeed":  # on CPU only --num_gpus starts more than one process (facts.md)
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(free_port()), "train.py"]
    raise ValueError(launcher)


@dataclass
class Run:
    run_dir: Path
    returncode: int
    output: str

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]

    def trajectory(self, key: str) -> list[float]:
        return [r[key] for r in self.metrics()]

    def held(self) -> dict[int, tuple[int, int]]:
        """rank -> (parameter elements held, total), from the engine's report lines."""
        return {int(m.group(1)): (int(m.group(4)), int(m.group(5))) for m in HELD_RE.finditer(self.output)}

    def launchers(self) -> set[str]:
        """How the ranks were started, as backends.launcher() detected it."""
        return {m.group(6) for m in HELD_RE.finditer(self.output)}

    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error: ")]


def train(run_dir, overrides, *, launcher="torchrun", nproc=2, config=None, ds_config=None, env=None,
          timeout=300) -> Run:
    cmd = launch_cmd(launcher, nproc)
    if ds_config is not None:
        cmd += ["--ds_config", str(ds_config)]
    # configs/base_stage1.yaml unless told: never the demo config, whose recipe is tuned for SmolLM2 (and whose
    # block-influence warm start needs one process)
    cmd += ["--config", str(config if config is not None else REPO / "configs" / "base_stage1.yaml")]
    cmd += [f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=timeout)
    return Run(Path(run_dir), proc.returncode, proc.stdout + proc.stderr)


def write_text_files(folder: Path, sources: list[str], chars: int = 12000, count: int = 3) -> list[str]:
    """A few small training files cut from the given texts (fast to tokenise)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, src in enumerate(sources[:count]):
        text = Path(src).read_text(encoding="utf-8", errors="ignore")
        start = len(text) // 3  # skip the Gutenberg header
        path = folder / f"part{i}.txt"
        path.write_text(text[start:start + chars], encoding="utf-8")
        out.append(str(path))
    return out


# The CPU tests' ZeRO-3 settings, laid over the production ds_configs/zero3.json (which stays tuned for GPUs):
# - persistence thresholds 0: the tiny test models are below every production threshold, so without this nothing
#   would be partitioned and ZeRO-3 would not be exercised (facts.md);
# - no prefetch and no overlap: the tests compare loss trajectories with one process to 1e-4 and DeepSpeed's
#   prefetch trace cache had trouble with data-dependent execution here; overlap buys nothing on gloo. (ZeRO-3 with
#   the production overlap_comm/prefetch also trains on CPU: tests/test_production_settings.py runs it.)
ZERO3_CPU_TEST_OVERRIDES = {
    "overlap_comm": False,
    "stage3_prefetch_bucket_size": 0,
    "stage3_param_persistence_threshold": 0,
    "stage3_model_persistence_threshold": 0,
}


def play_snippets(root: Path, train_chars: int, eval_chars: int) -> dict[str, list[str]]:
    """{"train": 2 files, "eval": 1 file} cut from the builtin plays' train / eval split (small runs' data)."""
    from skipgpt_dist.assets import shakespeare_files

    root = Path(root)
    return {"train": write_text_files(root / "train", shakespeare_files("train"), chars=train_chars, count=2),
            "eval": write_text_files(root / "eval", shakespeare_files("eval"), chars=eval_chars, count=1)}


def zero3_all_sharded(folder: Path, base: str | Path = REPO / "ds_configs" / "zero3.json") -> Path:
    """The production ZeRO-3 config (ds_configs/zero3.json unless told) with ZERO3_CPU_TEST_OVERRIDES: every
    parameter partitioned, even tiny ones, and the CPU tests' deterministic settings."""
    data = json.loads(Path(base).read_text())
    data["zero_optimization"].update(ZERO3_CPU_TEST_OVERRIDES)
    path = Path(folder) / "zero3_all_sharded.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def tiny_run_overrides(root: Path, model_dir: str, steps: int, eval_files: bool = True) -> list[str]:
    """The small distributed-test setup (tests/test_distributed.py's): the tiny model, seq_len 32, a few small
    training files, `steps` steps of grad_accum_steps 2, capacity mode at capacity 1.0, seed 3."""
    from skipgpt_dist.assets import shakespeare_files

    root = Path(root)
    overrides = [f"model.path={model_dir}", "data.seq_len=32", "logging.progress=false", f"optim.max_steps={steps}",
                 "optim.warmup_steps=1", "optim.grad_accum_steps=2", "routers.mode=capacity", "routers.capacity=1.0",
                 "seed=3",
                 f"data.train_files={json.dumps(write_text_files(root / 'train_text', shakespeare_files('train')))}"]
    if eval_files:
        held_out = write_text_files(root / "eval_text", shakespeare_files("eval"), chars=3000, count=1)
        overrides += ["data.eval_sequences=2", f"data.eval_files={json.dumps(held_out)}"]
    return overrides
