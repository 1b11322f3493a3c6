"""The family conformance suite (issue #16): every family in routing_models.FAMILIES, both KV policies, on tiny
random configs, holds what a supported family must hold:

- routing disabled, and routers that execute every token (mask; capacity with static slots), == the plain Hugging
  Face model (logits, padding left and right): the adapter's math against the family's own forward;
- capacity == mask with nothing overflowing (capacity 1.0): logits and router gradients, padding left and right;
- cached generate() == greedy decoding by full forwards, left padding;
- 2-rank ZeRO-3 (every tensor partitioned) and FSDP2 == one process: two stage-1 steps of train.py's own loop per
  model type (KV policies alternating down the list); one real `torchrun --standalone` launch (gloo) per back end
  runs every family in turn (this file is its worker), against one process run in this process;
- merge round trip: a stage-2 checkpoint in train.py's layout (routers + the project's own peft LoRA) through
  tools/merge_lora.py loads with plain AutoModelForCausalLM (== the dense model with its adapters) and with
  load_routed_model (== the routed model with unmerged adapters);
- a tiny Qwen3 through train.py stage 1 -> stage 2 -> tools/merge_lora.py -> load_routed_model(...).generate().

Adding a family = its adapter (skipgpt_dist/routing/adapters.py) plus one line in FAMILIES. A family without an
adapter fails every test here with the project's "not supported" error.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import HELD_RE, REPO, child_env, launch_cmd, write_text_files, zero3_all_sharded  # noqa: E402
from routing_models import FAMILIES, batch, build, logits_on_real, scramble_routers, train_step_grads  # noqa: E402

from skipgpt_dist import routing_disabled, routing_stats  # noqa: E402

NAMES = sorted(FAMILIES)
POLICIES = ("all", "routed")
PADDINGS = ("left", "right")
BASE_CONFIG = REPO / "configs" / "base_stage1.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from a second thread, and this module's torchrun ranks share the machine's cores
    with it: two OpenMP threads per process oversubscribe them (a 2-step tiny run took 5 s instead of 0.4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overflow(model) -> int:
    return sum(layer[kind]["overflow"] for layer in routing_stats(model)["layers"] for kind in ("attn", "mlp"))


# ---------------------------------------------------------------- one process, in memory

# What each tiny config adds to the Llama block, undone one at a time: each must move the plain model's logits, or
# the tests below could pass with an adapter that ignores it.
FEATURES = {
    "qwen3 sliding layer": ("qwen3", {"layer_types": ["full_attention"] * 3}),
    "gemma2 attention soft-cap": ("gemma2", {"attn_logit_softcapping": None}),
    "gemma2 final soft-cap": ("gemma2", {"final_logit_softcapping": None}),
    "gemma2 sliding layers": ("gemma2", {"layer_types": ["full_attention"] * 3}),
    "gemma2 query_pre_attn_scalar": ("gemma2", {"query_pre_attn_scalar": 12}),
    "phi3 partial rotary": ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 1.0}}),
    "mixtral top-2": ("mixtral", {"num_experts_per_tok": 1}),
    "mistral window": ("mistral", {"sliding_window": None}),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_tiny_configs_exercise_their_family_features(feature):
    family, change = FEATURES[feature]
    ids, mask = batch(seed=1, padding="left")
    torch.manual_seed(0)
    model = FAMILIES[family]().float().eval()
    config = copy.deepcopy(model.config)  # (the model reads its own config at forward time too)
    for key, value in change.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    without = type(model)(config).float().eval()
    with torch.no_grad():
        assert (logits_on_real(model, ids, mask) - logits_on_real(without, ids, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", NAMES)
def test_routing_off_or_executing_everything_is_the_plain_model(family, policy):
    """Routing disabled, and routers that execute every token (mask; capacity with static slots, so the gathered
    path runs), compute the family's own Hugging Face forward: the adapter's math against HF's."""
    torch.manual_seed(0)  # build() seeds alike: the same weights
    plain = FAMILIES[family]().float().eval()
    routed = build(family, mode="capacity", capacity=1.0, kv_policy=policy, skip_shift=0.5)
    dense = {mode: build(family, mode=mode, capacity=1.0, kv_policy=policy, inference_slots="static")
             for mode in ("mask", "capacity")}
    for model in dense.values():
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "skipgpt_" in name:  # execute logit 50, skip logit -50
                    param.copy_(torch.tensor([50.0, -50.0]) if name.endswith("net.bias") else torch.zeros_like(param))
    with torch.no_grad():
        for padding in PADDINGS:
            ids, mask = batch(seed=1, padding=padding)
            want = logits_on_real(plain, ids, mask)
            with routing_disabled(routed):
                torch.testing.assert_close(logits_on_real(routed, ids, mask), want, atol=1e-5, rtol=1e-5)
            for mode, model in dense.items():
                torch.testing.assert_close(logits_on_real(model, ids, mask), want, atol=1e-5, rtol=1e-5,
                                           msg=lambda m, mode=mode: f"{mode}: {m}")
                assert routing_stats(model)["sparsity"] == 0.0
            assert (logits_on_real(routed, ids, mask) - want).abs().max() > 1e-3, "routing must change the output"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", NAMES)
def test_capacity_equals_mask_outputs_and_router_gradients(family, policy):
    """mode=mask (dense estimator) against real skipping at capacity 1.0 (static slots, probe estimator: every
    skipped token is probed, so it is the dense gradient)."""
    for seed, padding in enumerate(PADDINGS):
        ids, mask = batch(seed=5 + seed, padding=padding)
        reference = build(family, mode="mask", kv_policy=policy, skip_shift=0.5)
        routed = build(family, mode="capacity", capacity=1.0, kv_policy=policy, skip_shift=0.5,
                       inference_slots="static")
        with torch.no_grad():
            want = logits_on_real(reference, ids, mask)
            sparsity = routing_stats(reference)["sparsity"]
            got = logits_on_real(routed, ids, mask)
        assert 0.15 < sparsity < 0.7, f"routers must really skip for this test to mean anything ({sparsity})"
        assert overflow(routed) == 0 and routing_stats(routed)["sparsity"] == pytest.approx(sparsity)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

        loss_mask, grads_mask = train_step_grads(reference, ids, mask)
        loss_cap, grads_cap = train_step_grads(routed, ids, mask)
        torch.testing.assert_close(loss_cap, loss_mask, atol=1e-5, rtol=1e-5)
        layers = reference.config.num_hidden_layers
        assert grads_mask.keys() == grads_cap.keys() and len(grads_mask) == 4 * layers  # 2 routers x (weight, bias)
        for name in grads_mask:
            assert grads_mask[name].abs().sum() > 0, name
            torch.testing.assert_close(grads_cap[name], grads_mask[name], atol=1e-5, rtol=1e-4)


def greedy_by_full_forwards(model, ids, mask, steps: int) -> torch.Tensor:
    """What generate() must produce: each token the argmax of a full forward (no cache) over all before it, at the
    positions generate() gives left-padded rows (cumulative count of real tokens)."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", NAMES)
def test_cached_generate_equals_full_forward_greedy(family, policy):
    ids, mask = batch(seed=13, padding="left", batch_size=2, seq_len=9)
    model = build(family, mode="capacity", capacity=1.0, kv_policy=policy, skip_shift=0.5)
    model.generation_config.eos_token_id = None  # every row runs all steps, as the reference does
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
                                pad_token_id=0)
        want = greedy_by_full_forwards(model, ids, mask, steps=6)
        assert routing_stats(model)["sparsity"] > 0.1  # (the last full forward's decisions)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, want), (cached[:, 9:], want[:, 9:])


# ---------------------------------------------------------------- saved tiny models (vocabulary of builtin:tiny)


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """family -> a save_pretrained folder of its tiny config with builtin:tiny's tokenizer (and its vocabulary)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("families")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dirs = {}
    for family in NAMES:
        template = FAMILIES[family]()
        template.config.vocab_size = len(tokenizer)
        torch.manual_seed(0)
        model = type(template)(template.config).float()  # the family's class, from its config
        dirs[family] = root / family
        model.save_pretrained(str(dirs[family]))
        tokenizer.save_pretrained(str(dirs[family]))
    return dirs


@pytest.fixture(scope="module")
def train_files(tmp_path_factory) -> list[str]:
    from skipgpt_dist.assets import shakespeare_files

    return write_text_files(tmp_path_factory.mktemp("family_text"), shakespeare_files("train"), chars=6000, count=2)


@pytest.fixture(scope="module", autouse=True)
def start_subprocesses_first(request):
    """The selected tests' subprocess work (the torchrun launches, the Qwen3 pipeline) starts with the module and
    runs beside the in-memory tests, which use one thread, instead of after them."""
    selected = {name for item in request.session.items if item.module is request.module
                for name in item.fixturenames}
    for fixture in ("dist_launches", "qwen3_pipeline"):
        if fixture in selected:
            request.getfixturevalue(fixture)


# ---------------------------------------------------------------- distributed == one process (2 ranks, real launches)

DIST_STEPS = 2


def dist_overrides(model_dir: Path, run_dir: Path, files: list[str], policy: str) -> list[str]:
    return [f"model.path={model_dir}", f"run_dir={run_dir}", "data.seq_len=32", "logging.progress=false",
            "eval.at_end=false", "data.eval_files=[]", "checkpoint.every_steps=0", "routers.mode=capacity",
            "routers.capacity=1.0", f"routers.kv_policy={policy}", "seed=3", f"optim.max_steps={DIST_STEPS}",
            "optim.warmup_steps=0", "optim.lr=1e-2", f"data.train_files={json.dumps(files)}"]


def run_families(runs: dict[str, list[str]]) -> None:
    """train.py's loop on each config in turn (this process, or every rank of a launch); a SkipGPTError (such as
    an unsupported family) is written to the run folder as error.txt and the next run goes on."""
    import os

    from skipgpt_dist.config import load_config
    from skipgpt_dist.errors import SkipGPTError
    from skipgpt_dist.training.loop import run

    for overrides in runs.values():
        try:
            run(load_config(str(BASE_CONFIG), overrides, for_training=True))
        except SkipGPTError as err:
            if os.environ.get("RANK", "0") == "0":
                run_dir = Path(next(o for o in overrides if o.startswith("run_dir="))[len("run_dir="):])
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(f"{err}\n")


def worker(spec: str) -> int:
    from skipgpt_dist.training.backends import exit_process

    run_families(json.loads(Path(spec).read_text()))
    return exit_process(0)


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=child_env({"PYTHONPATH": str(REPO)}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, what: str) -> str:
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"{what} failed:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def dist_launches(family_dirs, train_files, tmp_path_factory):
    """Starts the ZeRO-3 and FSDP2 launches (2 ranks, micro-batch 2); -> (root, runs per backend, processes).
    Each model type once per launch, the KV policy alternating down the list so both policies reach both back ends
    (the policies' semantics per family are the in-memory tests' part; a run costs ~1.5 s of CPU under ZeRO-3)."""
    root = tmp_path_factory.mktemp("family_dist")
    ds_config = zero3_all_sharded(root)
    extra = {"none": ["optim.micro_batch_size=4"],
             "zero3": ["optim.micro_batch_size=2", "parallel.backend=deepspeed", f"parallel.ds_config={ds_config}"],
             "fsdp2": ["optim.micro_batch_size=2", "parallel.backend=fsdp2"]}
    one_per_type = {}  # (llama_mha and llama_gqa: one Llama adapter, one sharding)
    for family in NAMES:
        one_per_type.setdefault(json.loads((family_dirs[family] / "config.json").read_text())["model_type"], family)
    plan = {family: POLICIES[i % 2] for i, family in enumerate(sorted(one_per_type.values()))}
    runs = {backend: {f"{family}/{policy}": dist_overrides(family_dirs[family], root / backend / family / policy,
                                                           train_files, policy) + more
                      for family, policy in plan.items()}
            for backend, more in extra.items()}
    launches = {}
    for backend in ("zero3", "fsdp2"):
        spec = root / f"{backend}.json"
        spec.write_text(json.dumps(runs[backend]))
        launches[backend] = start(launch_cmd("torchrun", 2)[:-1] + [__file__, "--worker", str(spec)])
    yield root, runs, launches
    for proc in launches.values():
        if proc.poll() is None:  # (the tests that wait for it did not run)
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def dist_runs(dist_launches):
    """backend -> {family/policy: run folder} for one process (micro-batch 4, run here) and the two launches."""
    root, runs, launches = dist_launches
    run_families(runs["none"])  # the reference, while the launches run
    outputs = {backend: finish(proc, f"the {backend} launch") for backend, proc in launches.items()}
    return {backend: {name: root / backend / name for name in runs["none"]} for backend in runs}, outputs


def run_result(run_dir: Path) -> tuple[list[dict], dict]:
    """(metrics rows, final routers) of a run folder; fails with the run's error if it did not train."""
    from safetensors.torch import load_file

    if (run_dir / "error.txt").is_file():
        pytest.fail((run_dir / "error.txt").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return [r for r in rows if "loss" in r], load_file(str(checkpoint / "routers.safetensors"))


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_two_ranks_equal_one_process_for_every_family(backend, dist_runs):
    folders, outputs = dist_runs
    failures = []
    for name in sorted(folders["none"]):
        try:
            want_rows, want_routers = run_result(folders["none"][name])
            got_rows, got_routers = run_result(folders[backend][name])
            assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows] == list(range(1, DIST_STEPS + 1))
            for key, atol, rtol in (("loss", 1e-4, 0), ("lm_loss", 1e-4, 0), ("grad_norm", 1e-6, 1e-3)):
                got, want = [r[key] for r in got_rows], [r[key] for r in want_rows]
                assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                      atol=atol, rtol=rtol), (key, got, want)
            assert want_rows[1]["loss"] != want_rows[0]["loss"] and want_rows[0]["grad_norm"] > 0
            assert got_routers.keys() == want_routers.keys()
            for key in want_routers:
                torch.testing.assert_close(got_routers[key], want_routers[key], atol=1e-5, rtol=0,
                                           msg=lambda m, key=key: f"{key}: {m}")
        except (AssertionError, pytest.fail.Exception) as err:
            failures.append(f"{name}: {str(err).strip().splitlines()[0][:300]}")
    assert not failures, "\n".join(failures)
    # every family's model really sharded: each rank's "holds N of M parameter elements" line, about half
    held = [(int(m.group(4)), int(m.group(5))) for m in HELD_RE.finditer(outputs[backend])]
    assert len(held) == 2 * len(folders["none"]), outputs[backend][-3000:]
    assert all(mine <= total / 2 * 1.05 + 64 for mine, total in held), held


# ---------------------------------------------------------------- merge / export round trip


def stage2_checkpoint(model_dir: Path, folder: Path, policy: str):
    """A stage-2 checkpoint in train.py's layout for the model in model_dir: routers that skip, and LoRA applied by
    the project's own apply_lora (its target modules for the family) with random non-zero B. Returns the peft
    model (routed, unmerged) the export must reproduce."""
    from transformers import AutoModelForCausalLM

    from skipgpt_dist import RouterConfig, attach_routers, save_routers
    from skipgpt_dist.config import load_config, save_config
    from skipgpt_dist.training.model_setup import apply_lora

    folder.mkdir(parents=True)
    cfg = load_config(None, [f"model.path={model_dir}", "stage.stage=2", f"stage.init_from={folder}",
                             "stage.lora.r=4", "stage.lora.alpha=8", "stage.lora.dropout=0",
                             "routers.mode=capacity", "routers.capacity=1.0", f"routers.kv_policy={policy}"])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    attach_routers(model, RouterConfig(mode="capacity", capacity=1.0, kv_policy=policy))
    scramble_routers(model, seed=7, skip_shift=0.5)
    save_routers(model, folder / "routers.safetensors")
    peft_model = apply_lora(model, cfg.stage.lora)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(str(folder / "adapter"))
    save_config(cfg, folder / "config.yaml")
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "stage": 2, "backend": "none",
                                                           "complete": True}))
    return peft_model.eval()


def run_merge_tool(argv: list[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_merge_lora", REPO / "tools" / "merge_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", NAMES)
def test_merged_export_loads_dense_and_routed(family, policy, family_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from skipgpt_dist.inference import load_routed_model

    unmerged = stage2_checkpoint(family_dirs[family], tmp_path / "ckpt", policy)
    out = tmp_path / "export"
    run_merge_tool(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)])
    ids, mask = batch(seed=17, padding="left", vocab=unmerged.config.vocab_size)
    with torch.no_grad():
        want_routed = logits_on_real(unmerged, ids, mask)
        with routing_disabled(unmerged):
            want_dense = logits_on_real(unmerged, ids, mask)
            with unmerged.disable_adapter():
                base = logits_on_real(unmerged, ids, mask)
        assert (want_dense - base).abs().max() > 1e-2, "the LoRA must change the model for this test to mean anything"
        assert (want_routed - want_dense).abs().max() > 1e-2, "routing must change the output"

        dense = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert type(dense).__name__ == type(unmerged.get_base_model()).__name__
        torch.testing.assert_close(logits_on_real(dense, ids, mask), want_dense, atol=1e-4, rtol=1e-4)
        section = json.loads((out / "config.json").read_text())["skipgpt"]
        assert section["kv_policy"] == policy and section["lora"]["merged"]
        for mode in (None, "mask"):
            routed = load_routed_model(out, mode=mode)
            torch.testing.assert_close(logits_on_real(routed, ids, mask), want_routed, atol=1e-4, rtol=1e-4)
            assert routing_stats(routed)["sparsity"] > 0.1


# ---------------------------------------------------------------- Qwen3 through the real pipeline

PIPELINE = """
import runpy, sys
import train
stage1, stage2, merge = {argvs!r}
assert train.main(stage1) == 0 and train.main(stage2) == 0
sys.argv = ["tools/merge_lora.py"] + merge
runpy.run_path("tools/merge_lora.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def qwen3_pipeline(family_dirs, train_files, tmp_path_factory):
    """Starts train.py stage 1 (routers, real skipping) -> stage 2 (LoRA) -> tools/merge_lora.py on the tiny Qwen3,
    in one subprocess (one interpreter start); -> (run root, process)."""
    root = tmp_path_factory.mktemp("qwen3_pipeline")
    common = [f"model.path={family_dirs['qwen3']}", "data.seq_len=32", "logging.progress=false", "eval.at_end=false",
              "data.eval_files=[]", "checkpoint.every_steps=0", "optim.warmup_steps=0", "optim.micro_batch_size=4",
              f"data.train_files={json.dumps(train_files)}"]
    stage1 = ["--config", "configs/tiny.yaml", f"run_dir={root / 's1'}", "optim.max_steps=4", "optim.lr=0.1",
              "routers.init_margin=0.5", *common]
    stage2 = ["--config", "configs/tiny_stage2.yaml", f"run_dir={root / 's2'}", f"stage.init_from={root / 's1'}",
              "optim.max_steps=2", "optim.lr=3e-2", "stage.lora.r=4", "stage.lora.alpha=8", *common]
    merge = ["--checkpoint", str(root / "s2"), "--out", str(root / "export")]
    proc = start([sys.executable, "-c", PIPELINE.format(argvs=(stage1, stage2, merge))])
    yield root, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_qwen3_through_stage1_stage2_merge_and_generate(qwen3_pipeline):
    """The pipeline's export generates: the same greedy tokens as the unmerged stage-2 checkpoint, with real
    skipping, and loads as a plain dense Qwen3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skipgpt_dist.inference import load_routed_model

    root, proc = qwen3_pipeline
    finish(proc, "train.py stage 1 -> stage 2 -> merge_lora.py")
    out = root / "export"
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    prompt = tokenizer(["To be, or not to be", "Now is the winter"], return_tensors="pt", padding=True,
                       padding_side="left")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    routed = load_routed_model(out)
    assert type(routed).__name__ == "Qwen3ForCausalLM" and routed.config.skipgpt["stage"] == 2
    unmerged = load_routed_model(root / "s2")  # the checkpoint: base + routers + unmerged adapters
    dense = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        tokens = routed.generate(**prompt, **kwargs)
        assert torch.equal(tokens, unmerged.generate(**prompt, **kwargs))
        assert dense.generate(**prompt, **kwargs).shape == tokens.shape == (2, prompt["input_ids"].shape[1] + 8)
        mask = torch.cat([prompt["attention_mask"], torch.ones(2, 8, dtype=torch.long)], dim=1)
        torch.testing.assert_close(routed(tokens, attention_mask=mask).logits,
                                   unmerged(tokens, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)
    assert routing_stats(routed)["sparsity"] > 0.02, "the trained routers must skip for this test to mean anything"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.exit(worker(sys.argv[2]))
