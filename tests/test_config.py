"""TrainConfig: defaults, example configs, overrides, validation messages, save/load round trip."""
from pathlib import Path

import pytest

from skipgpt_dist.config import TrainConfig, config_to_dict, load_config, save_config
from skipgpt_dist.errors import SkipGPTError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg == TrainConfig()
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.data.shuffle_seed is None
    assert cfg.stage.lora.target_modules == ["q_proj", "v_proj", "gate_proj"]
    assert cfg.global_batch_size(world_size=2) == cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * 2


def test_example_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "tiny_stage2.yaml", "smollm2_stage1.yaml", "smollm2_stage2.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.validate() is cfg
    if cfg.stage.stage == 2:
        assert cfg.stage.init_from


def test_overrides_of_each_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\nstage:\n  stage: 2\n  init_from: runs/a\n")
    cfg = load_config(str(path), [
        "optim.lr=3e-4",                        # YAML 1.1 reads this as a string; float keys accept it
        "optim.max_steps=7",
        "optim.grad_clip=2",                    # int for a float key
        "optim.betas=[0.8, 0.99]",
        "logging.wandb=true",
        "data.train_files=[a.txt,b.txt]",
        "data.shuffle_seed=5",
        "stage.stage=1",
        "stage.init_from=null",
        "stage.lora.r=4",
        "routers.capacity=0.75",
        "run_dir=runs/x=y",                     # only the first '=' splits
    ])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.max_steps == 7
    assert cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.logging.wandb is True
    assert cfg.data.train_files == ["a.txt", "b.txt"]
    assert cfg.data.shuffle_seed == 5
    assert cfg.stage.stage == 1 and cfg.stage.init_from is None
    assert cfg.stage.lora.r == 4
    assert cfg.routers.capacity == 0.75
    assert cfg.run_dir == "runs/x=y"


def test_empty_section_and_empty_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("logging:\n# everything commented out\n")
    assert load_config(str(path)) == TrainConfig()
    path.write_text("")
    assert load_config(str(path)) == TrainConfig()


@pytest.mark.parametrize("override, needles", [
    ("optim.lrr=1", ["optim.lrr", "did you mean optim.lr", "weight_decay"]),
    ("seq_len=64", ["seq_len", "did you mean data.seq_len"]),
    ("routers.capcity=0.5", ["routers.capcity", "did you mean routers.capacity"]),
    ("optim.max_steps=abc", ["optim.max_steps", "an integer"]),
    ("optim.max_steps=2.5", ["optim.max_steps", "an integer"]),
    ("optim.lr=abc", ["optim.lr", "a number"]),
    ("logging.wandb=3", ["logging.wandb", "true or false"]),
    ("data.train_files=5", ["data.train_files", "a list"]),
    ("data.train_files=[]", ["data.train_files", "empty"]),
    ("model.path=null", ["model.path", "a string"]),
    ("model=3", ["model", "mapping"]),
    ("optim.betas=[0.9]", ["optim.betas", "2 values"]),
    ("optim.betas=[0.9, 1.5]", ["optim.betas", "[0, 1)"]),
    ("routers.capacity=abc", ["routers.capacity", "a number"]),
    ("data.seq_len=1", ["data.seq_len", ">= 2"]),
    ("optim.lr=0", ["optim.lr", "> 0"]),
    ("optim.max_steps=0", ["optim.max_steps", ">= 1"]),
    ("optim.micro_batch_size=0", ["optim.micro_batch_size", ">= 1"]),
    ("optim.grad_accum_steps=0", ["optim.grad_accum_steps", ">= 1"]),
    ("checkpoint.keep_last=0", ["checkpoint.keep_last", ">= 1"]),
    ("stage.lora.r=0", ["stage.lora.r", ">= 1"]),
    ("stage.lora.dropout=1", ["stage.lora.dropout", "< 1"]),
    ("stage.stage=3", ["stage.stage", "1, 2"]),
    ("stage.stage=2", ["stage.init_from"]),
    ("routers.capacity=1.5", ["routers.capacity", "(0, 1]"]),
    ("model.dtype=fp16", ["model.dtype", "float32, bfloat16"]),
    ("data.format=csv", ["data.format", "jsonl"]),
    ("optim.schedule=linear", ["optim.schedule", "cosine"]),
    ("logging.wandb_mode=online2", ["logging.wandb_mode", "offline"]),
    ("parallel.backend=ddp", ["parallel.backend", "fsdp2"]),
    ("parallel.mixed_precision=fp16", ["parallel.mixed_precision", "bf16"]),
    ("routers.mode=dense", ["routers.mode", "capacity"]),
    ("optim.lr.x=1", ["optim.lr"]),
    ("optim.lr", ["optim.lr", "no '='"]),
    ("optim.lr=[1", ["optim.lr", "not valid YAML"]),
])
def test_bad_override_names_the_key(override, needles):
    with pytest.raises(SkipGPTError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  max_steps: [1, 2\nseed: 3\n")
    with pytest.raises(SkipGPTError, match=r"malformed YAML in .*bad\.yaml line \d+") as info:
        load_config(str(path))
    assert "\n" not in str(info.value)
    path.write_text("optim:\n  lr: 1\n lr2: 3\n")
    with pytest.raises(SkipGPTError, match=r"bad\.yaml line 3"):
        load_config(str(path))


def test_file_errors(tmp_path):
    with pytest.raises(SkipGPTError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(SkipGPTError, match="cannot read"):
        load_config(str(tmp_path))  # a folder
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SkipGPTError, match="must hold a mapping"):
        load_config(str(path))
    path.write_text("optim:\n  nope: 1\n")
    with pytest.raises(SkipGPTError, match="optim.nope"):
        load_config(str(path))


def test_direct_construction_is_validated():
    from skipgpt_dist.config import OptimConfig

    with pytest.raises(SkipGPTError, match="optim.lr"):
        OptimConfig(lr=-1.0)
    cfg = TrainConfig()
    cfg.optim.max_steps = 0  # edited after construction: validate() catches it
    with pytest.raises(SkipGPTError, match="optim.max_steps"):
        cfg.validate()


def test_save_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0] if CONFIGS else None, [
        "optim.lr=3e-4", "optim.eps=1e-12", "routers.target_sparsity_attn=0.4", "routers.target_sparsity_mlp=0.1",
        "stage.stage=2", "stage.init_from=runs/a", "parallel.ds_config=ds.json", "data.eval_files=[]",
    ])
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    again = load_config(str(path))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(config_to_dict(cfg)["optim"]["betas"], list)


def test_error_lines_are_printed_once_per_launch_and_message(tmp_path):
    """print_error_once in three children of this one parent (as the ranks of a node share their launcher): two
    share a message and it prints once; the third has its own and prints it. A lone process always prints."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    script = f"import sys; sys.path.insert(0, {root!r}); from skipgpt_dist.errors import print_error_once; " \
             "print_error_once(sys.argv[1])"
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")}

    def stderr_of(message, **env):
        return subprocess.run([sys.executable, "-c", script, message], capture_output=True, text=True,
                              env={**base, "TMPDIR": str(tmp_path), **env}).stderr

    ranks = [stderr_of(m, LOCAL_WORLD_SIZE="3") for m in ("error: same", "error: same", "error: rank-specific")]
    assert ranks == ["error: same\n", "", "error: rank-specific\n"]
    assert stderr_of("error: same") == "error: same\n"


def test_compile_with_deepspeed_is_a_one_line_error():
    with pytest.raises(SkipGPTError) as info:
        load_config(None, ["parallel.backend=deepspeed", "parallel.compile=true"])
    assert "\n" not in str(info.value) and "parallel.backend=fsdp2" in str(info.value)
    assert load_config(None, ["parallel.backend=fsdp2", "parallel.compile=true"]).parallel.compile
