"""Export tools on real checkpoints: merge_lora (design.md invariant 4: merged == unmerged with adapters, logits
atol 1e-4 fp32) for one-process, DeepSpeed ZeRO-3 and FSDP2 (DCP) checkpoints, from the portable adapter/ and from
the engine's own files; the exported folder through load_routed_model (same greedy tokens) and plain transformers;
streaming (peak RSS of a merge over a many-shard model ~ one shard); consolidate; the routing report; one-line
errors for bad input with nothing left at --out.

Training runs are real (tiny builtin model, seq_len 32, small text files): stage 1 in one process with a high
learning rate so the routers really skip, then stage 2 in one process, under `torchrun` with ZeRO-3 (every tensor
partitioned) and with FSDP2, 2 ranks each. They are memoised in this module (training_run) so
tests/test_memory_plan.py reuses the 2-rank runs for its sharding check.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import REPO, child_env, train, write_text_files, zero3_all_sharded  # noqa: E402

from skipgpt_dist.checkpoint import find_checkpoint  # noqa: E402

ATOL = 1e-4
STAGE2_KINDS = ("none", "zero3", "fsdp2")

# ---------------------------------------------------------------- memoised training runs (shared with test_memory_plan)

_RUNS: dict = {}


def _common(root: Path, model_dir: str) -> list[str]:
    from skipgpt_dist.assets import shakespeare_files

    files = write_text_files(root / "text", shakespeare_files("train"), chars=8000, count=2)
    return [f"model.path={model_dir}", "data.seq_len=32", "logging.progress=false", "eval.at_end=false",
            "checkpoint.every_steps=0", "routers.mode=capacity", "routers.capacity=1.0", "seed=5",
            f"data.train_files={json.dumps(files)}", "data.eval_files=[]", "optim.warmup_steps=0"]


def training_run(kind: str, root: Path, model_dir: str):
    """`stage1`: one process, routers that skip. `none` / `zero3` / `fsdp2`: stage 2 from it (2 ranks for the
    distributed back ends; the three start together on first use). Memoised per session."""
    if kind not in _RUNS:
        common = _common(root, model_dir)
        stage1 = _RUNS.get("stage1") or train(root / "stage1", common + [
            "optim.lr=0.1", "optim.max_steps=4", "optim.micro_batch_size=4"], launcher="python", nproc=1)
        _RUNS["stage1"] = stage1
        if kind != "stage1":
            assert stage1.returncode == 0, stage1.output[-3000:]
            stage2 = common + ["stage.stage=2", f"stage.init_from={stage1.run_dir}", "stage.lora.r=4",
                               "stage.lora.alpha=8", "optim.lr=3e-2", "optim.max_steps=2"]
            jobs = {"none": lambda: train(root / "s2_none", stage2 + ["optim.micro_batch_size=4"], launcher="python",
                                          nproc=1),
                    "zero3": lambda: train(root / "s2_zero3", stage2 + ["optim.micro_batch_size=2"],
                                           ds_config=zero3_all_sharded(root)),
                    "fsdp2": lambda: train(root / "s2_fsdp2", stage2 + ["optim.micro_batch_size=2",
                                                                        "parallel.backend=fsdp2"])}
            with ThreadPoolExecutor(len(jobs)) as pool:  # the launches overlap their start-up and waits
                futures = {name: pool.submit(job) for name, job in jobs.items()}
                _RUNS.update({name: future.result() for name, future in futures.items()})
    return _RUNS[kind]


def checkpoint_or_xfail(run, kind: str) -> Path:
    if run.returncode != 0:
        errors = [line for line in run.output.splitlines() if "Error" in line or line.startswith("error:")]
        reason = errors[-1][:300] if errors else run.output[-300:]
        if kind in ("zero3", "fsdp2"):
            pytest.xfail(f"{kind} stage-2 training does not run yet (back end in progress): {reason}")
        pytest.fail(f"{kind} training failed: {run.output[-3000:]}")
    return find_checkpoint(run.run_dir)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tool_runs")


@pytest.fixture(scope="module")
def stage1_ckpt(runs_root, tiny_model_dir) -> Path:
    return checkpoint_or_xfail(training_run("stage1", runs_root, tiny_model_dir), "stage1")


@pytest.fixture(scope="module")
def stage2_ckpt(runs_root, tiny_model_dir):
    def get(kind: str) -> Path:
        return checkpoint_or_xfail(training_run(kind, runs_root, tiny_model_dir), kind)
    return get


@pytest.fixture(scope="module")
def merged(stage2_ckpt, tmp_path_factory):
    """kind -> folder exported by tools/merge_lora.py from that back end's stage-2 checkpoint."""
    cache = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"merged_{kind}") / "model"
            run_tool("merge_lora", ["--checkpoint", str(stage2_ckpt(kind)), "--out", str(out)])
            cache[kind] = out
        return cache[kind]
    return get


# ---------------------------------------------------------------- helpers


def run_tool(name: str, argv: list[str], expect_exit: int | None = None, capsys=None) -> str:
    """Run tools/NAME.py's main in this process; returns its stderr when capsys is given."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if expect_exit is None:
        module.main(argv)
        return ""
    if capsys is not None:
        capsys.readouterr()  # drop what the test itself printed before
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == expect_exit
    return capsys.readouterr().err if capsys is not None else ""


def one_line_error(stderr: str, *needles: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), list(out.parent.iterdir())


def sample_ids(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (batch, length), generator=generator)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def unmerged(ckpt: Path, mode: str | None = None):
    from skipgpt_dist.training.restore import load_checkpoint_model

    return load_checkpoint_model(str(ckpt), mode=mode)[0]


def copy_without_adapter(ckpt: Path, dest: Path) -> Path:
    shutil.copytree(ckpt, dest)
    shutil.rmtree(dest / "adapter")
    return dest


# ---------------------------------------------------------------- merge == unmerged (invariant 4)


@pytest.mark.parametrize("kind", STAGE2_KINDS)
def test_merged_equals_unmerged(kind, stage2_ckpt, stage1_ckpt, merged):
    from skipgpt_dist import load_routed_model, routing_stats

    ckpt = stage2_ckpt(kind)
    out = merged(kind)
    ids = sample_ids()
    for mode in ("capacity", "mask"):
        routed = load_routed_model(out, mode=mode)
        got, want = logits_of(routed, ids), logits_of(unmerged(ckpt, mode), ids)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert routing_stats(routed)["sparsity"] > 0.02  # the routers really skip: the comparison covers routing
    # load_routed_model also takes the checkpoint itself (base + routers + unmerged adapters)
    torch.testing.assert_close(logits_of(load_routed_model(ckpt, mode="mask"), ids), got, atol=ATOL, rtol=0)
    no_lora = logits_of(unmerged(stage1_ckpt), ids)
    assert (got - no_lora).abs().max() > 50 * ATOL  # the adapters really change the model


@pytest.mark.parametrize("kind", STAGE2_KINDS)
def test_merge_reads_engine_files_without_adapter(kind, stage2_ckpt, merged, tmp_path):
    """No adapter/: LoRA comes from trainable.safetensors / DeepSpeed's ZeRO files / the DCP folder."""
    from skipgpt_dist import load_routed_model

    ckpt = copy_without_adapter(stage2_ckpt(kind), tmp_path / "ckpt")
    out = tmp_path / "model"
    run_tool("merge_lora", ["--checkpoint", str(ckpt), "--out", str(out)])
    source = json.loads((out / "config.json").read_text())["skipgpt"]["lora"]["source"]
    assert "engine" in source
    ids = sample_ids(1)
    torch.testing.assert_close(logits_of(load_routed_model(out), ids), logits_of(load_routed_model(merged(kind)), ids),
                               atol=1e-6, rtol=0)


def test_exported_folder_generates_and_loads_dense(stage2_ckpt, merged):
    from transformers import AutoModelForCausalLM

    from skipgpt_dist import load_routed_model, routing_disabled

    out = merged("none")
    for name in ("config.json", "model.safetensors.index.json", "routers.safetensors", "generation_config.json",
                 "tokenizer.json"):
        assert (out / name).is_file(), name
    section = json.loads((out / "config.json").read_text())["skipgpt"]
    assert section["mode"] == "capacity" and section["kv_policy"] == "all" and section["lora"]["merged"]
    routed, reference = load_routed_model(out), unmerged(stage2_ckpt("none"))
    assert not routed.training
    prompt = sample_ids(2, batch=1, length=6)
    with torch.no_grad():
        got = routed.generate(prompt, max_new_tokens=12, do_sample=False)
        want = reference.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    with captured_warnings() as seen:
        dense = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not seen, seen  # the extra `skipgpt` key in config.json neither breaks nor warns
    with routing_disabled(routed):
        torch.testing.assert_close(logits_of(dense, prompt), logits_of(routed, prompt), atol=1e-5, rtol=0)


@contextlib.contextmanager
def captured_warnings():
    """Python warnings and transformers' WARNING/ERROR log records raised inside the block."""
    records: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Handler(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught if not issubclass(w.category, ResourceWarning))
    finally:
        logger.removeHandler(handler)


# ---------------------------------------------------------------- consolidate


@pytest.mark.parametrize("kind", STAGE2_KINDS)
def test_consolidate_full_and_trainable(kind, stage2_ckpt, tmp_path):
    from safetensors.torch import load_file

    from skipgpt_dist.config import load_config
    from skipgpt_dist.training.model_setup import build_model

    ckpt = stage2_ckpt(kind)
    full, trainable = tmp_path / "full.safetensors", tmp_path / "trainable.safetensors"
    run_tool("consolidate", [str(ckpt), "--out", str(full)])
    run_tool("consolidate", [str(ckpt), "--out", str(trainable), "--trainable-only"])
    weights = load_file(str(trainable))
    assert weights and all("lora_" in k or "skipgpt_" in k for k in weights)
    assert sum("lora_A" in k for k in weights) == 4 * 3 and sum("skipgpt_" in k for k in weights) == 16
    model = build_model(load_config(str(ckpt / "config.yaml")))[0]
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    result = model.load_state_dict(load_file(str(full)), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"base_model.model.lm_head.weight"}  # tied
    ids = sample_ids(3)
    torch.testing.assert_close(logits_of(model.eval(), ids), logits_of(unmerged(ckpt), ids), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- streaming: peak memory ~ one shard


def make_checkpoint(model, model_dir: Path, folder: Path, lora_r: int = 8) -> Path:
    """A stage-2 checkpoint folder in train.py's layout (config.yaml, trainer_state.json, routers, adapter/)."""
    from peft import LoraConfig, get_peft_model

    from skipgpt_dist import RouterConfig, attach_routers, save_routers
    from skipgpt_dist.config import load_config, save_config

    folder.mkdir(parents=True)
    attach_routers(model, RouterConfig())
    save_routers(model, folder / "routers.safetensors")
    peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "gate_proj"]))
    peft_model.save_pretrained(str(folder / "adapter"))
    cfg = load_config(None, [f"model.path={model_dir}", "stage.stage=2", f"stage.init_from={folder}",
                             f"stage.lora.r={lora_r}", f"stage.lora.alpha={2 * lora_r}"])
    save_config(cfg, folder / "config.yaml")
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "stage": 2, "backend": "none",
                                                           "complete": True}))
    return folder


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """~100 MB fp32 Llama saved in 8 MB shards, and a stage-2 checkpoint (routers + random LoRA) for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("many_shards")
    config = LlamaConfig(vocab_size=1024, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1376, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(root / "base"), max_shard_size="8MB")
    ckpt = make_checkpoint(model, root / "base", root / "ckpt")
    return root / "base", ckpt


# Peak resident memory of the child itself: VmHWM of its own address space. (Its ru_maxrss would also carry this
# test process's RSS: Linux folds the pre-exec address space's high-water mark of a forked child into its rusage.)
_PEAK = ("import resource, runpy, sys\n"
         "sys.argv = {argv!r}\n"
         "{body}\n"
         "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
         "print('PEAK_KB', hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")
_IMPORTS = ("import torch, safetensors, yaml\n"
            "import skipgpt_dist.export, skipgpt_dist.config, skipgpt_dist.checkpoint, skipgpt_dist.assets, "
            "skipgpt_dist.routing")


def peak_rss(argv: list[str], body: str) -> tuple[int, str]:
    code = _PEAK.format(argv=argv, body=body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_KB")))
    return kb * 1024, proc.stdout


def test_merge_streams_shard_by_shard(many_shards, tmp_path):
    from safetensors import safe_open

    base, ckpt = many_shards
    shards = sorted(base.glob("model-*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    model_bytes = sum(p.stat().st_size for p in shards)
    adapters = (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size
    assert len(shards) >= 10 and model_bytes > 60e6
    out = tmp_path / "merged"
    argv = ["merge_lora.py", "--base", str(base), "--checkpoint", str(ckpt), "--out", str(out)]
    baseline, _ = peak_rss(argv, _IMPORTS)
    peak, stdout = peak_rss(argv, _IMPORTS + "\nrunpy.run_path('tools/merge_lora.py', run_name='__main__')")
    assert sum("[merge_lora] shard" in line for line in stdout.splitlines()) == len(shards)
    grown = peak - baseline
    print(f"merge peak RSS {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB, grown {grown / 2**20:.1f} MiB;"
          f" largest shard {largest / 2**20:.1f} MiB, model {model_bytes / 2**20:.0f} MiB")
    assert grown < 3 * largest + adapters, (grown, largest, adapters)
    assert grown < model_bytes / 3
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == [p.name for p in shards]
    key = "model.layers.5.mlp.gate_proj.weight"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    adapter = {}
    with safe_open(str(ckpt / "adapter" / "adapter_model.safetensors"), "pt") as f:
        for half in "AB":
            adapter[half] = f.get_tensor(f"base_model.model.model.layers.5.mlp.gate_proj.lora_{half}.weight")
    with safe_open(str(base / index[key]), "pt") as f:
        want = f.get_tensor(key) + 2.0 * adapter["B"] @ adapter["A"]
    with safe_open(str(out / index[key]), "pt") as f:
        torch.testing.assert_close(f.get_tensor(key), want, atol=1e-6, rtol=0)


def test_merge_bf16_base_in_fp32(tiny_model_dir, tmp_path):
    """A bf16 base: W' = (W.float() + s * B.float() @ A.float()).to(bf16), exactly; dtype kept."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base_bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(str(base))
    ckpt = make_checkpoint(model, base, tmp_path / "ckpt", lora_r=4)
    out = tmp_path / "out"
    run_tool("merge_lora", ["--checkpoint", str(ckpt), "--out", str(out)])
    key = "model.layers.2.self_attn.v_proj.weight"
    with safe_open(str(ckpt / "adapter" / "adapter_model.safetensors"), "pt") as f:
        a, b = (f.get_tensor(f"base_model.model.model.layers.2.self_attn.v_proj.lora_{h}.weight") for h in "AB")
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        want = (f.get_tensor(key).float() + 2.0 * b.float() @ a.float()).to(torch.bfloat16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = f.get_tensor(key)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


# ---------------------------------------------------------------- routing report


def test_routing_report_writes_png_and_json(merged, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "report"
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    run_tool("routing_report", [str(merged("none")), "--text", text, "--out", str(out)])
    image = imread(str(out / "report.png"))
    assert image.ndim == 3 and image.shape[0] >= 400 and image.shape[1] >= 600, image.shape
    assert image[..., :3].std() > 0.05  # not blank
    report = json.loads((out / "report.json").read_text())
    assert report["num_layers"] == 4 and len(report["tokens"]) == report["num_tokens"] > 10
    for kind in ("attn", "mlp"):
        grid = torch.tensor(report["executed"][kind], dtype=torch.float64)
        assert grid.shape == (4, report["num_tokens"])
        ratios = torch.tensor([layer[kind]["execute"] for layer in report["layers"]], dtype=torch.float64)
        torch.testing.assert_close(grid.mean(dim=1), ratios)  # the token map is the routing the model ran
    assert 0 < report["sparsity"] < 1


def test_routing_report_reads_a_checkpoint(stage1_ckpt, tmp_path, capsys):
    out = tmp_path / "report"
    run_tool("routing_report", [str(stage1_ckpt), "--text", "Now is the winter of our discontent", "--out", str(out)])
    assert (out / "report.png").stat().st_size > 10_000
    err = run_tool("routing_report", [str(stage1_ckpt), "--text", "", "--out", str(out)], expect_exit=2,
                   capsys=capsys)
    one_line_error(err, "text is empty")


def test_routing_report_under_torchrun_is_written_by_rank_0_only(stage1_ckpt, tmp_path, monkeypatch):
    """torchrun's other ranks exit before loading anything: one report, no two processes writing one file."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run_tool("routing_report", [str(stage1_ckpt), "--text", "Now is the winter", "--out", str(tmp_path / "r1")])
    assert not (tmp_path / "r1").exists()
    monkeypatch.setenv("RANK", "0")
    run_tool("routing_report", [str(stage1_ckpt), "--text", "Now is the winter", "--out", str(tmp_path / "r0")])
    assert (tmp_path / "r0" / "report.json").is_file()


# ---------------------------------------------------------------- --device-map (accelerate dispatch)


def whole_layer_map(tiny_model_dir: str, path: Path, **changes) -> Path:
    """A device map of every top-level module of the tiny model to the CPU (one entry per decoder layer, as
    --device-map auto makes for GPUs), with `changes` (module -> device) applied."""
    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    mapping = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(layers)},
               "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu", **changes}
    path.write_text(json.dumps({k: v for k, v in mapping.items() if v is not None}))
    return path


def tool_line(name: str, argv: list[str], capsys) -> dict:
    capsys.readouterr()
    run_tool(name, argv)
    return json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])


def test_device_map_keeps_the_routing_and_the_figures(stage2_ckpt, stage1_ckpt, tiny_model_dir, tmp_path, capsys):
    """Dispatched by a device map (accelerate's hooks on every module: force_hooks, so one device runs the
    multi-GPU path), eval_ppl prints what one device prints, LoRA included, and calibrate_routers writes the same
    routers. A model dispatched before its routers were attached would run dense: sparsity 0."""
    from safetensors.torch import load_file

    layer_map = str(whole_layer_map(tiny_model_dir, tmp_path / "map.json"))
    ckpt = stage2_ckpt("none")
    args = [str(ckpt), "--data", *train_files(ckpt), "--sequences", "3"]
    plain = tool_line("eval_ppl", args, capsys)
    mapped = tool_line("eval_ppl", args + ["--device-map", layer_map], capsys)
    assert plain["sparsity"] > 0.05
    for key in ("ppl_routed", "ppl_dense", "attn_sparsity", "mlp_sparsity"):
        assert mapped[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-9), key
    cal = ["--sparsity", "0.4", "--sequences", "3", "--data", *train_files(ckpt)]
    tool_line("calibrate_routers", [str(stage1_ckpt), "--out", str(tmp_path / "cal_plain"), *cal], capsys)
    tool_line("calibrate_routers", [str(stage1_ckpt), "--out", str(tmp_path / "cal_mapped"), *cal,
                                    "--device-map", layer_map], capsys)
    got, want = (load_file(str(tmp_path / name / "routers.safetensors")) for name in ("cal_mapped", "cal_plain"))
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    before = load_file(str(stage1_ckpt / "routers.safetensors"))
    assert any(not torch.allclose(before[k], want[k]) for k in want)  # calibration moved them


def test_routers_refuse_a_model_dispatched_before_they_were_attached(tiny_model_dir, tmp_path):
    """accelerate keeps a dispatched layer's original forward: routers attached after it would never run (the
    model silently dense), so attach_routers says so; place_model dispatches after attaching."""
    from accelerate import dispatch_model

    from skipgpt_dist.errors import SkipGPTError
    from skipgpt_dist.routing import RouterConfig, attach_routers
    from skipgpt_dist.training.model_setup import load_base_model

    model = load_base_model(tiny_model_dir, "float32", False)
    mapping = json.loads(whole_layer_map(tiny_model_dir, tmp_path / "map.json").read_text())
    model = dispatch_model(model, device_map=mapping, force_hooks=True)
    with pytest.raises(SkipGPTError, match="before routers were attached"):
        attach_routers(model, RouterConfig(mode="mask"))


def train_files(ckpt: Path) -> list[str]:
    from skipgpt_dist.config import load_config

    return load_config(str(ckpt / "config.yaml")).data.train_files


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file"),
    ("not_json", "not readable JSON"),
    ("unknown_module", "does not fit this model"),
    ("offload", "offloading"),
    ("disk", "offloads to disk"),
    ("torchrun", "without torchrun"),
])
def test_bad_device_map_is_a_one_line_error(case, needle, stage1_ckpt, tiny_model_dir, tmp_path, capsys,
                                            monkeypatch):
    maps = {"missing": tmp_path / "absent.json",
            "not_json": tmp_path / "broken.json",
            "unknown_module": whole_layer_map(tiny_model_dir, tmp_path / "u.json", lm_head=None, **{"model.head": "cpu"}),
            "offload": whole_layer_map(tiny_model_dir, tmp_path / "o.json", **{"model.embed_tokens": 0}),
            "disk": whole_layer_map(tiny_model_dir, tmp_path / "d.json", lm_head="disk"),
            "torchrun": whole_layer_map(tiny_model_dir, tmp_path / "t.json")}
    (tmp_path / "broken.json").write_text("{model.layers.0: cpu")
    if case == "torchrun":
        monkeypatch.setenv("WORLD_SIZE", "2")
    err = run_tool("eval_ppl", [str(stage1_ckpt), "--sequences", "2", "--device-map", str(maps[case])],
                   expect_exit=2, capsys=capsys)
    # (a map checked against the loaded model comes after transformers' "Loading weights" progress line)
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], err


# ---------------------------------------------------------------- bad input: one-line errors, nothing half-written


@pytest.fixture(scope="module")
def sharded_tiny(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny base re-saved in several shards (with its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sharded_tiny") / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(str(folder), max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(str(folder))
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder


def test_error_adapter_for_another_base(stage2_ckpt, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    config = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(other))
    out = tmp_path / "out"
    err = run_tool("merge_lora", ["--base", str(other), "--checkpoint", str(stage2_ckpt("none")), "--out", str(out)],
                   expect_exit=2, capsys=capsys)
    one_line_error(err, "does not fit base model", "gate_proj", "--base")
    assert_nothing_left(out)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_error_damaged_shard(damage, sharded_tiny, stage2_ckpt, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(sharded_tiny, base)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    else:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    err = run_tool("merge_lora", ["--base", str(base), "--checkpoint", str(stage2_ckpt("none")), "--out", str(out)],
                   expect_exit=2, capsys=capsys)
    one_line_error(err, shard.name, "missing" if damage == "missing" else "truncated", "re-download")
    assert_nothing_left(out)


def test_merge_sharded_base_keeps_sharding(sharded_tiny, stage2_ckpt, merged, tmp_path):
    from skipgpt_dist import load_routed_model

    out = tmp_path / "out"
    run_tool("merge_lora", ["--base", str(sharded_tiny), "--checkpoint", str(stage2_ckpt("none")), "--out", str(out)])
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == \
        sorted(p.name for p in sharded_tiny.glob("model-*.safetensors"))
    ids = sample_ids(4)
    want = logits_of(load_routed_model(merged("none")), ids)
    torch.testing.assert_close(logits_of(load_routed_model(out), ids), want, atol=1e-6, rtol=0)


def test_error_checkpoint_without_lora(stage1_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    err = run_tool("merge_lora", ["--checkpoint", str(stage1_ckpt), "--out", str(out)], expect_exit=2, capsys=capsys)
    one_line_error(err, "no LoRA weights", "stage.stage=2")
    assert_nothing_left(out)


def test_error_output_exists_then_force(stage2_ckpt, tmp_path, capsys):
    ckpt = str(stage2_ckpt("none"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    err = run_tool("merge_lora", ["--checkpoint", ckpt, "--out", str(mine)], expect_exit=2, capsys=capsys)
    one_line_error(err, "already exists", "--force")
    err = run_tool("merge_lora", ["--checkpoint", ckpt, "--out", str(mine), "--force"], expect_exit=2, capsys=capsys)
    one_line_error(err, "not a folder written by merge_lora")  # --force never deletes an unrelated folder
    assert (mine / "keep.txt").read_text() == "user data"
    err = run_tool("consolidate", [ckpt, "--out", str(mine / "keep.txt")], expect_exit=2, capsys=capsys)
    one_line_error(err, "already exists", "--force")
    export = tmp_path / "export"
    run_tool("merge_lora", ["--checkpoint", ckpt, "--out", str(export)])
    (export / "stale.txt").write_text("from an older export")
    run_tool("merge_lora", ["--checkpoint", ckpt, "--out", str(export), "--force"])
    assert not (export / "stale.txt").exists() and (export / "routers.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or moved-aside folders left


def test_error_output_would_replace_input(stage2_ckpt, merged, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(merged("none"), export)  # an export used as the base of another merge
    err = run_tool("merge_lora", ["--base", str(export), "--checkpoint", str(stage2_ckpt("none")), "--out", str(export),
                                  "--force"], expect_exit=2, capsys=capsys)
    one_line_error(err, "would replace the base model")
    assert (export / "config.json").is_file()
    err = run_tool("merge_lora", ["--checkpoint", str(stage2_ckpt("none")), "--out", str(stage2_ckpt("none")),
                                  "--force"], expect_exit=2, capsys=capsys)
    one_line_error(err, "not a folder written by merge_lora")
