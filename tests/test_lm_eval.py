"""lm-evaluation-harness integration (skipgpt_dist/lm_eval_model.py): `skipgpt-lm-eval --model skipgpt` on a real
routed export of the tiny model through lm-eval's command line; SmolLM2-135M through lm_eval.simple_evaluate with
routing off and on (well above chance on the local skipgpt_mc task, so the loglikelihood path is wired right);
the general-knowledge task skipgpt_general_mc (its items checked, scored on the tiny export); one-line errors for
bad model arguments.

Exports are real tools/merge_lora.py folders, made from a stage-2 checkpoint whose routers are at their initial
state (they execute every token at eval) and whose LoRA is zero (peft's default B = 0), so the exported weights
are the base model's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skipgpt_dist.errors import SkipGPTError

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "skipgpt_dist" / "lm_eval_tasks"
QUESTIONS = sum(1 for line in (TASKS_DIR / "skipgpt_mc" / "skipgpt_mc.jsonl").read_text().splitlines() if line)
OFFLINE = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2",
           "TOKENIZERS_PARALLELISM": "false"}


def routed_export(base: str, out: Path) -> Path:
    """merge_lora's folder for `base` with fresh routers and a zero LoRA (the base's own weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from skipgpt_dist import RouterConfig, attach_routers, save_routers
    from skipgpt_dist.config import load_config, save_config
    from skipgpt_dist.export import merge_lora

    ckpt = out.with_name(out.name + "-ckpt")
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    attach_routers(model, RouterConfig())
    save_routers(model, ckpt / "routers.safetensors")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])  # B = 0: merging changes nothing
    get_peft_model(model, lora).save_pretrained(str(ckpt / "adapter"))
    cfg = load_config(None, [f"model.path={base}", "stage.stage=2", f"stage.init_from={ckpt}", "stage.lora.r=4",
                             "stage.lora.alpha=8", "data.train_files=[builtin:shakespeare-train]"])
    save_config(cfg, ckpt / "config.yaml")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "stage": 2, "backend": "none",
                                                         "complete": True}))
    return merge_lora(ckpt, out, log=lambda msg: None)


def cli(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """The installed `skipgpt-lm-eval` console script (setup.py entry point) in a fresh, offline process."""
    script = Path(sys.executable).with_name("skipgpt-lm-eval")
    assert script.is_file(), f"{script} missing: reinstall with `pip install -e .[dev]`"
    return subprocess.run([str(script), *argv], cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-4000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir, tmp_path_factory) -> Path:
    return routed_export(tiny_model_dir, tmp_path_factory.mktemp("lm_eval") / "tiny-routed")


def test_cli_runs_skipgpt_mc_on_tiny_export(tiny_export, tmp_path):
    # capacity=0.5 with static slots: every router wants to execute, so half the tokens of each sequence overflow
    # and are skipped (dynamic inference slots, the default, never overflow)
    out = tmp_path / "results"
    proc = cli(["--model", "skipgpt", "--model_args",
                f"pretrained={tiny_export},capacity=0.5,dtype=float32,inference_slots=static",
                "--tasks", "skipgpt_mc", "--include_path", str(TASKS_DIR), "--output_path", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 1, files
    results = json.loads(files[0].read_text())
    assert 0.0 <= results["results"]["skipgpt_mc"]["acc,none"] <= 1.0
    assert results["n-samples"]["skipgpt_mc"]["effective"] == QUESTIONS == 36
    routing = results["config"]["skipgpt"]
    assert routing["routing"] == "on" and routing["mode"] == "capacity" and routing["capacity"] == 0.5
    assert 0.35 < routing["sparsity"] < 0.55 and routing["overflow"] > 0 and routing["forwards"] > 0, routing


def test_general_mc_loads_and_runs_on_tiny_export(tiny_export):
    # skipgpt_general_mc: >= 100 hand-written general-knowledge items, every answer a valid index of 4 distinct
    # choices, answers spread over the positions; scored in-process (no lm-eval task indexing) on the tiny export
    import lm_eval
    from lm_eval.tasks import TaskManager

    import skipgpt_dist.lm_eval_model  # noqa: F401  (registers --model skipgpt)

    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    docs = list(tasks.load("skipgpt_general_mc")["tasks"]["skipgpt_general_mc"].test_docs())
    assert len(docs) >= 100 and len({d["question"] for d in docs}) == len(docs)
    for doc in docs:
        assert len(doc["choices"]) == len(set(doc["choices"])) == 4 and 0 <= doc["answer"] < 4, doc
    assert {d["answer"] for d in docs} == {0, 1, 2, 3}
    results = lm_eval.simple_evaluate(model="skipgpt", model_args={"pretrained": str(tiny_export), "dtype": "float32"},
                                      tasks=["skipgpt_general_mc"], task_manager=tasks, batch_size=8)
    assert results["n-samples"]["skipgpt_general_mc"]["effective"] == len(docs)
    assert 0.0 <= results["results"]["skipgpt_general_mc"]["acc,none"] <= 1.0
    assert results["config"]["skipgpt"]["forwards"] > 0


def smollm2_accuracy(export: Path, tasks, **model_args) -> tuple[float, dict]:
    import lm_eval

    import skipgpt_dist.lm_eval_model  # noqa: F401  (registers --model skipgpt)

    results = lm_eval.simple_evaluate(model="skipgpt", model_args={"pretrained": str(export), "dtype": "float32",
                                                                   **model_args},
                                      tasks=["skipgpt_mc"], task_manager=tasks, batch_size=8)
    assert results["n-samples"]["skipgpt_mc"]["effective"] == QUESTIONS
    return results["results"]["skipgpt_mc"]["acc,none"], results["config"]["skipgpt"]


def test_smollm2_well_above_chance_routing_off_and_on(tmp_path):
    from lm_eval.tasks import TaskManager

    from skipgpt_dist.assets import resolve_model_path

    export = routed_export(resolve_model_path("builtin:smollm2-135m"), tmp_path / "smollm2-routed")
    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # skip indexing lm-eval's 15k tasks
    acc_off, info_off = smollm2_accuracy(export, tasks, routing="off")
    acc_on, info_on = smollm2_accuracy(export, tasks)  # the trained mode: capacity 1.0, routers execute all
    print(f"SmolLM2-135M skipgpt_mc acc: routing off {acc_off:.3f}, on {acc_on:.3f}; on: {info_on}")
    assert info_off["routing"] == "off" and "sparsity" not in info_off
    assert acc_off >= 0.5, acc_off  # chance is 0.25
    assert info_on["sparsity"] == 0.0 and info_on["overflow"] == 0, info_on
    assert abs(acc_on - acc_off) <= 1 / QUESTIONS, (acc_on, acc_off)  # same computation up to float rounding


@pytest.mark.parametrize("model_args, needles", [
    ("pretrained=/nonexistent/routed", ["pretrained=/nonexistent/routed is not a folder", "merge_lora"]),
    ("pretrained={export},mode=fast", ["mode='fast' is not a routing mode", "capacity"]),
    ("pretrained={export},batch_size=4", ["--batch_size"]),
])
def test_cli_bad_model_args_one_line(model_args, needles, tiny_export):
    proc = cli(["--model", "skipgpt", "--model_args", model_args.format(export=tiny_export), "--tasks", "skipgpt_mc",
                "--include_path", str(TASKS_DIR)], timeout=120)
    one_error_line(proc, *needles)


def test_padding_competes_for_slots_needs_batch_size_1(tiny_export):
    from skipgpt_dist.lm_eval_model import SkipGPTLM

    with pytest.raises(SkipGPTError, match="batch_size=4 with mode=capacity capacity=0.5.*--batch_size 1"):
        SkipGPTLM(pretrained=str(tiny_export), capacity=0.5, batch_size=4)
    for ok in ({"capacity": 0.5, "routing": "off"}, {"mode": "mask", "capacity": 0.5}, {}):  # padding-safe
        assert SkipGPTLM(pretrained=str(tiny_export), batch_size=4, **ok).batch_size == 4


def test_checkpoint_folder_scores_like_its_export(tiny_export):
    # the stage-2 checkpoint behind the export (routers + unmerged zero LoRA through peft) loads as well
    from peft import PeftModel

    from skipgpt_dist.lm_eval_model import SkipGPTLM

    ids = torch.randint(1, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    exported = SkipGPTLM(pretrained=str(tiny_export), mode="mask")
    checkpoint = SkipGPTLM(pretrained=str(tiny_export.with_name(tiny_export.name + "-ckpt")), mode="mask")
    assert isinstance(checkpoint.model, PeftModel)
    assert checkpoint.tokenizer.get_vocab() == exported.tokenizer.get_vocab()
    torch.testing.assert_close(checkpoint._model_call(ids), exported._model_call(ids), atol=1e-5, rtol=0)
    assert checkpoint.routing_summary()["forwards"] == 1 and exported.routing_summary()["sparsity"] < 0.5
