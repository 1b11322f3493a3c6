"""tools/import_official.py on fixtures in the official SkipGPT code's own state-dict layout (EIT-NLP/SkipGPT at
fb2a203): a tiny random Llama whose layers are wrapped as router_attn_mlp.py wraps them (router_attention,
router_mlp, block), saved with torch.save(model.state_dict()) as torch_save.py:23 saves it (stage 1), and the same
under peft as the post_training run saves it (stage 2, train_processing_two_stages.py:89-100).

Checks: the imported routers give the official router's logits and decisions; the imported checkpoint computes the
official layer (router_attn_mlp.py:131-187) with deterministic gates, in mask and in capacity mode, through the
project's own readers; its LoRA merges with tools/merge_lora.py into a folder plain transformers loads; bad input is
one line, exit 2, and an existing --out is left as it was.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tools import one_line_error, run_tool  # noqa: E402

HIDDEN, LAYERS, VOCAB = 48, 3, 97


class OfficialTokenRouter(nn.Module):
    """router_attn_mlp.py:33-63 (TokenRouter), as written there."""

    def __init__(self, embed_dim):
        super().__init__()
        intermediate_dim = embed_dim // 4
        self.hidden_layer = nn.Linear(embed_dim, intermediate_dim)
        self.relu = nn.ReLU()
        self.weight_predictor = nn.Linear(intermediate_dim, 2)
        nn.init.kaiming_uniform_(self.hidden_layer.weight, nonlinearity='relu')
        nn.init.kaiming_uniform_(self.weight_predictor.weight, nonlinearity='linear')
        nn.init.zeros_(self.hidden_layer.bias)
        nn.init.zeros_(self.weight_predictor.bias)

    def forward(self, x):
        original_type = x.dtype
        x = self.relu(self.hidden_layer(x.to(self.hidden_layer.weight.dtype)))
        return self.weight_predictor(x.to(self.weight_predictor.weight.dtype)).to(original_type)


def official_gate(logits: torch.Tensor) -> torch.Tensor:
    """router_attn_mlp.py:134-138: gate = one-hot(gumbel_softmax(logits, hard=True))[..., 0], the sample's
    execute row; here without the noise, as the import serves it: execute iff logit 0 > logit 1 (design.md)."""
    return (logits[..., 0] > logits[..., 1]).to(logits.dtype).unsqueeze(-1)


class OfficialLayer(nn.Module):
    """router_attn_mlp.py:65-205 (router_attn_mlp_llama): attribute names as there, forward :131-187 with
    official_gate in place of the sampled gate."""

    def __init__(self, block, hidden_size):
        super().__init__()
        self.router_attention = OfficialTokenRouter(hidden_size)
        self.router_mlp = OfficialTokenRouter(hidden_size)
        self.block = block

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        gate = official_gate(self.router_attention(hidden_states))  # :131-138, reads the raw layer input
        residual = hidden_states
        out = self.block.self_attn(hidden_states=self.block.input_layernorm(hidden_states),
                                   attention_mask=attention_mask, position_embeddings=position_embeddings)[0]
        hidden_states = out * gate + residual  # :161
        gate_mlp = official_gate(self.router_mlp(residual))  # :167-174, the same layer input
        residual = hidden_states
        return self.block.mlp(self.block.post_attention_layernorm(hidden_states)) * gate_mlp + residual  # :187


def tiny_base(folder: Path, hidden: int = HIDDEN, seed: int = 0):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=hidden, intermediate_size=80, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(str(folder))
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>").save_pretrained(str(folder))
    return model


def official_model(base_dir: Path, seed: int = 1):
    """The base with every layer wrapped as apply_router_attn_mlp does (router_attn_mlp.py:372-393)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model.model.layers = nn.ModuleList(OfficialLayer(layer, HIDDEN) for layer in model.model.layers)
    with torch.no_grad():  # "trained" biases: the official init's zero biases tie both logits where ReLU is all off
        for name, param in model.named_parameters():
            if "router" in name and name.endswith("bias"):
                param.normal_(0.0, 0.3)
    return model.eval()


def official_peft(model, seed: int = 2):
    """The stage-2 (post_training) LoRA: train_processing_two_stages.py:89-100, with random B so it matters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                            lora_dropout=0.1, bias="none", init_lora_weights=False)).eval()


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    tiny_base(root / "base")
    model = official_model(root / "base")
    (root / "stage1" / "checkpoint-200").mkdir(parents=True)
    torch.save(model.state_dict(), root / "stage1" / "checkpoint-200" / "model.pth")  # torch_save.py:18-23
    peft_model = official_peft(model)
    torch.save(peft_model.state_dict(), root / "stage2.bin")  # torch_save.py:41-46
    peft_model.save_pretrained(str(root / "peft_adapter"))
    return argparse.Namespace(root=root, base=root / "base", stage1=root / "stage1" / "checkpoint-200" / "model.pth",
                              stage2=root / "stage2.bin", adapter=root / "peft_adapter", model=peft_model)


@pytest.fixture(scope="module")
def stage1_import(fixture):
    out = fixture.root / "imported1"
    run_tool("import_official", ["--routers", str(fixture.stage1.parent), "--base", str(fixture.base),
                                 "--out", str(out)])
    return out


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (3, 21), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -5:] = mask[2, -9:] = 0  # right padding
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_routers_decide_as_the_official_router(fixture, stage1_import):
    from skipgpt_dist import load_routed_model
    from skipgpt_dist.routing import routed_layers

    ours = routed_layers(load_routed_model(stage1_import, mode="mask"))
    official = fixture.model.get_base_model().model.layers
    gen, executed = torch.Generator().manual_seed(3), []
    for layer, theirs in zip(ours, official):
        for mine, their in ((layer.skipgpt_attn_router, theirs.router_attention),
                            (layer.skipgpt_mlp_router, theirs.router_mlp)):
            h = torch.randn(4, 33, HIDDEN, generator=gen) * torch.logspace(-1, 2, 33).view(1, 33, 1)  # raw scales
            with torch.no_grad():
                got, want = mine(h), their(h)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            decisions = got[..., 0] > got[..., 1]
            assert torch.equal(decisions, want.argmax(-1) == 0)  # the official execute row wins
            executed.append(decisions.float().mean())
    assert 0.1 < torch.stack(executed).mean() < 0.9  # the fixture's routers really skip


def test_import_computes_the_official_model_in_mask_and_capacity(fixture, stage1_import, tmp_path):
    from skipgpt_dist import load_routed_model, routing_stats
    from skipgpt_dist.checkpoint import verify_checkpoint
    from skipgpt_dist.config import load_config

    assert verify_checkpoint(stage1_import) is None
    state = json.loads((stage1_import / "trainer_state.json").read_text())
    assert state["stage"] == 1 and state["imported_from"]["router_type"] == "mlp"
    ids, mask = batch()
    with fixture.model.disable_adapter():
        want = logits(fixture.model, ids, mask)
    real = mask.bool()
    mask_model = load_routed_model(stage1_import, mode="mask")
    got_mask = logits(mask_model, ids, mask)
    stats = routing_stats(mask_model)
    assert 0.1 < stats["sparsity"] < 0.9, stats
    got_capacity = logits(load_routed_model(stage1_import), ids, mask)  # the import's own mode: capacity
    torch.testing.assert_close(got_mask[real], want[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_capacity[real], got_mask[real], atol=1e-5, rtol=1e-5)
    # --force replaces an earlier import (here: with another recorded mode)
    again = tmp_path / "again"
    shutil.copytree(stage1_import, again)
    run_tool("import_official", ["--routers", str(fixture.stage1), "--base", str(fixture.base),
                                 "--out", str(again), "--mode", "mask", "--force"])
    assert load_config(str(again / "config.yaml")).routers.mode == "mask" and verify_checkpoint(again) is None


def test_stage2_lora_merges_and_loads_with_plain_transformers(fixture, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from skipgpt_dist import load_routed_model

    out, merged = tmp_path / "imported2", tmp_path / "merged"
    run_tool("import_official", ["--routers", str(fixture.stage2), "--base", str(fixture.base), "--out", str(out),
                                 "--lora-alpha", "8"])
    assert json.loads((out / "trainer_state.json").read_text())["stage"] == 2
    run_tool("merge_lora", ["--checkpoint", str(out), "--out", str(merged)])
    ids, mask = batch(1)
    real = mask.bool()
    want = logits(fixture.model, ids, mask)  # the official stage-2 model, deterministic gates
    for model in (load_routed_model(out, mode="mask"), load_routed_model(merged)):  # adapter; merged, capacity
        torch.testing.assert_close(logits(model, ids, mask)[real], want[real], atol=1e-4, rtol=1e-4)
    dense, info = AutoModelForCausalLM.from_pretrained(str(merged), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert logits(dense.eval(), ids, mask).isfinite().all()
    # the same LoRA from a peft adapter folder the official model saved (--lora) gives the same adapter
    again = tmp_path / "imported2_peft"
    run_tool("import_official", ["--routers", str(fixture.stage1), "--lora", str(fixture.adapter),
                                 "--base", str(fixture.base), "--out", str(again)])
    first, second = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((again / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 8


def _without(state: dict, *needles: str) -> dict:
    return {k: v for k, v in state.items() if not any(n in k for n in needles)}


BAD_INPUTS = {
    "missing key": (lambda s: _without(s, "layers.1.router_mlp.weight_predictor.bias"), "lacks"),
    "layer count": (lambda s: _without(s, "layers.2.router_"), "holds routers for 2 layers"),
    "unknown layout": (lambda s: _without(s, "router_"), "holds no official SkipGPT routers"),
    "other base weights": (lambda s: {k: (v + 1 if k.endswith("embed_tokens.weight") else v) for k, v in s.items()},
                           "differs from"),
    "incomplete LoRA": (lambda s: _without(s, "layers.0.block.mlp.gate_proj.lora_B"), "incomplete or inconsistent"),
    "pickled object": (lambda s: argparse.Namespace(state=s), "Python objects besides tensors"),
    "ZeRO-3 placeholders": (lambda s: {k: (v.new_empty(0) if "router_" in k else v) for k, v in s.items()},
                            "saved under ZeRO-3"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS) + ["hidden size", "out exists", "force over another folder"])
def test_bad_input_is_one_line_and_leaves_out_alone(case, fixture, stage1_import, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in stage1_import.rglob("*") if p.is_file()}
    routers, base, out, extra = tmp_path / "bad.pth", fixture.base, stage1_import, ["--force"]
    if case in BAD_INPUTS:
        edit, needle = BAD_INPUTS[case]
        torch.save(edit(torch.load(fixture.stage2, weights_only=True)), routers)
    elif case == "hidden size":
        routers, base, needle = fixture.stage1, tmp_path / "base64", "hidden size 64"
        tiny_base(base, hidden=64)
    else:
        routers = fixture.stage1
        needle = "already exists" if case == "out exists" else "not a folder written by import_official.py"
        if case == "out exists":
            extra = []
        else:
            out = tmp_path / "precious"
            out.mkdir()
            (out / "notes.txt").write_text("keep me")
    err = run_tool("import_official", ["--routers", str(routers), "--base", str(base), "--out", str(out)] + extra,
                   expect_exit=2, capsys=capsys)
    one_line_error("\n".join(line for line in err.splitlines() if not line.startswith("[import_official] ")), needle)
    if out == stage1_import:
        assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    else:
        assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())


def test_bf16_file_as_the_official_runs_save_it(fixture, tmp_path):
    """The official code loads the base in bf16 (models.py:25-29): a bf16 state dict imports against the fp32 base
    (its base weights compare after the same cast), its routers upcast exactly."""
    from safetensors.torch import load_file

    state = {k: v.to(torch.bfloat16) for k, v in torch.load(fixture.stage1, weights_only=True).items()}
    torch.save(state, tmp_path / "bf16.pth")
    run_tool("import_official", ["--routers", str(tmp_path / "bf16.pth"), "--base", str(fixture.base),
                                 "--out", str(tmp_path / "out")])
    routers = load_file(str(tmp_path / "out" / "routers.safetensors"))
    assert routers["layers.2.mlp_router.net.0.weight"].dtype == torch.float32
    assert torch.equal(routers["layers.2.mlp_router.net.0.weight"],
                       state["model.layers.2.router_mlp.hidden_layer.weight"].float())
    assert torch.equal(routers["layers.0.attn_router.net.2.bias"],
                       state["model.layers.0.router_attention.weight_predictor.bias"].float())
