"""Token shards (tools/prepare_data.py, skipgpt_dist.token_shards): round trip, determinism, resume, the lazy
rank-sharded loader, tokenizer checks and a training run on shards."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from skipgpt_dist import token_shards as ts
from skipgpt_dist.data import PackedBatches, pack_files
from skipgpt_dist.errors import SkipGPTError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """jsonl (with a blank line and an empty document), txt and parquet sources: ~40 documents."""
    from skipgpt_dist.assets import shakespeare_files

    d = tmp_path_factory.mktemp("corpus")
    play = Path(shakespeare_files("eval")[0]).read_text(encoding="utf-8")
    paras = [p for p in play.split("\n\n") if p.strip()][:60]
    a = d / "a.jsonl"
    a.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paras[:20]))
                 + "\n" + json.dumps({"text": ""}) + "\n", encoding="utf-8")
    b = d / "b.txt"
    b.write_text("\n\n".join(paras[20:40]), encoding="utf-8")
    c = str(d / "c.parquet")
    datasets.Dataset.from_dict({"text": paras[40:60]}).to_parquet(c)
    return [str(a), str(b), c]


def _expected_docs(corpus) -> list[list[str]]:
    from skipgpt_dist.data import load_text_dataset

    return [[t for t in load_text_dataset([f])["text"] if t] for f in corpus]


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def shards(corpus, tokenizer, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shards") / "s")
    ts.prepare_shards(corpus, out, tokenizer, num_proc=1, progress=False)
    return out


def test_round_trip_tokens_and_document_boundaries(shards, corpus, tokenizer):
    corpus_reader = ts.ShardCorpus(shards)
    m = corpus_reader.manifest
    assert m["dtype"] == "uint16" and corpus_reader.dtype == np.uint16 and m["format_version"] == 1
    assert m["tokenizer"]["sha256"] == ts.tokenizer_fingerprint(tokenizer)
    eos, total_docs, pos = tokenizer.eos_token_id, 0, 0
    for i, (docs, src) in enumerate(zip(_expected_docs(corpus), m["sources"])):
        assert src["source"] == os.path.abspath(corpus[i]) and src["size"] == os.path.getsize(corpus[i])
        assert src["sha256"] == ts.file_sha256(corpus[i])
        offsets = corpus_reader.document_offsets(i)
        assert offsets.dtype == np.int64 and len(offsets) == len(docs) + 1 and offsets[0] == 0
        for k, text in enumerate(docs):
            want = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            got = corpus_reader.tokens(pos + int(offsets[k]), pos + int(offsets[k + 1]))
            assert got.tolist() == want
        pos += int(offsets[-1])
        total_docs += len(docs)
    assert pos == m["num_tokens"] == corpus_reader.num_tokens and total_docs == m["num_documents"]


def test_packed_rows_equal_the_raw_file_path(shards, corpus, tokenizer):
    raw, lazy = pack_files(corpus, tokenizer, 48), pack_files(shards, tokenizer, 48)
    assert isinstance(lazy, ts.PackedShards) and len(raw) == len(lazy)
    assert torch.equal(raw.with_format("torch")[:]["input_ids"].long(), lazy.rows(range(len(lazy))))
    assert len(pack_files(os.path.join(shards, "manifest.json"), tokenizer, 48)) == len(raw)  # the manifest path


def test_deterministic_byte_identical_with_any_worker_count(shards, corpus, tokenizer, tmp_path):
    again = str(tmp_path / "again")
    ts.prepare_shards(corpus, again, tokenizer, num_proc=2, progress=False)
    assert _files(again) == _files(shards)


def test_prepare_resumes_after_an_interruption(shards, corpus, tokenizer, tmp_path, monkeypatch):
    out, real_finish, finished = str(tmp_path / "out"), ts._ShardWriter.finish, []

    def interrupted(self):
        if finished:  # killed while the second shard is being written: its tokens sit in a private tmp file
            raise KeyboardInterrupt
        finished.append(self.meta["source"])
        return real_finish(self)

    monkeypatch.setattr(ts._ShardWriter, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ts.prepare_shards(corpus, out, tokenizer, progress=False)
    assert not Path(out, "manifest.json").exists() and Path(out, "shard_00000.json").exists()
    assert not Path(out, "shard_00001.bin").exists() and any(p.name.startswith(".shard_00001.bin.")
                                                              for p in Path(out).iterdir())
    started = []
    real_init = ts._ShardWriter.__init__
    monkeypatch.setattr(ts._ShardWriter, "finish", real_finish)
    monkeypatch.setattr(ts._ShardWriter, "__init__",
                        lambda self, o, meta: started.append(meta["source"]) or real_init(self, o, meta))
    ts.prepare_shards(corpus, out, tokenizer, progress=False)
    assert started == [os.path.abspath(f) for f in corpus[1:]]  # the finished shard was skipped
    assert {k: v for k, v in _files(out).items() if not k.startswith(".")} == _files(shards)
    started.clear()
    Path(corpus[2]).touch()  # a new mtime, same content: still skipped (the key is the sha256)
    ts.prepare_shards(corpus, out, tokenizer, progress=False)
    assert started == []


def _batches(packed, mbs, gas, world, rank, seed=5):
    return PackedBatches(packed, mbs, gas, world, rank, seed)


def test_loader_state_dict_resumes_at_the_exact_position(shards, tokenizer):
    packed = pack_files(shards, tokenizer, 32)
    first = _batches(packed, 2, 2, 1, 0)
    for _ in range(first.steps_per_epoch - 1):  # the next steps cross into epoch 1
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_step() for _ in range(3)]
    second = _batches(pack_files(shards, tokenizer, 32), 2, 2, 1, 0)
    second.load_state_dict(state)
    for want, got in zip(expected, [second.next_step() for _ in range(3)]):
        for w, g in zip(want, got):
            assert torch.equal(w["input_ids"], g["input_ids"]) and torch.equal(w["sample_ids"], g["sample_ids"])
    assert first.epoch == 1


def test_each_rank_reads_only_its_rows_and_ranks_union_to_one_process(shards, tokenizer):
    one = pack_files(shards, tokenizer, 32)
    one.read_log = []
    ranks = [pack_files(shards, tokenizer, 32) for _ in range(2)]
    single = _batches(one, 4, 2, 1, 0)
    loaders = [_batches(p, 2, 2, 2, r) for r, p in enumerate(ranks)]
    for p in ranks:
        p.read_log = []
    for _ in range(3):
        ref = single.next_step()
        per_rank = [loader.next_step() for loader in loaders]
        for m in range(2):
            union = torch.cat([per_rank[r][m]["input_ids"] for r in range(2)])
            assert torch.equal(union, ref[m]["input_ids"])
    reads = [p.read_log for p in ranks]
    assert len(reads[0]) == len(reads[1]) == 3 * 2 * 2 and not set(reads[0]) & set(reads[1])
    perm = single._permutation(0).tolist()
    for r in range(2):  # rank r's rows are exactly positions [r*mbs, (r+1)*mbs) of every global micro-batch
        want = [perm[step * 8 + m * 4 + r * 2 + k] for step in range(3) for m in range(2) for k in range(2)]
        assert reads[r] == want
    assert sorted(reads[0] + reads[1]) == sorted(one.read_log)


def test_tokenizer_mismatch_is_one_line_naming_both(shards, tokenizer):
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<zz_new_token>"])
    with pytest.raises(SkipGPTError) as err:
        pack_files(shards, other, 32)
    msg = str(err.value)
    assert "\n" not in msg and "tokenised with" in msg and "but the model's tokenizer is" in msg
    assert ts.tokenizer_fingerprint(tokenizer)[:12] in msg and ts.tokenizer_fingerprint(other)[:12] in msg


def test_bad_inputs_are_one_line_errors(tmp_path, tokenizer, corpus):
    cases = []
    empty_docs = tmp_path / "e.jsonl"
    empty_docs.write_text(json.dumps({"text": ""}) + "\n")
    cases.append(([str(tmp_path / "nope.jsonl")], r"nope.jsonl does not exist"))
    cases.append(([str(empty_docs)], r"holds no text \(0 tokens in 1 files\)"))
    cases.append(([str(tmp_path / "*.parquet")], r"matches no file"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
    cases.append(([str(bad)], r"bad.jsonl line 2 is not JSON"))
    for files, pattern in cases:
        with pytest.raises(SkipGPTError, match=pattern) as err:
            ts.prepare_shards(files, str(tmp_path / "out"), tokenizer, progress=False)
        assert "\n" not in str(err.value)
    with pytest.raises(SkipGPTError, match=r"data.format=shards but .* is not one shard folder"):
        pack_files(corpus, tokenizer, 32, format="shards")


def test_prepare_cli_then_train_two_steps_on_shards(tiny_model_dir, corpus, tmp_path):
    out, run_dir = tmp_path / "shards", tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools/prepare_data.py"), "--tokenizer", tiny_model_dir,
                           "--out", str(out), *corpus, "-j", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["shards"] == 3 and summary["dtype"] == "uint16"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
                           f"model.path={tiny_model_dir}", f"run_dir={run_dir}", f"data.train_files=[{out}]",
                           f"data.eval_files=[{out / 'manifest.json'}]", "data.seq_len=32", "data.eval_sequences=2",
                           "optim.max_steps=2", "logging.progress=false", "checkpoint.every_steps=0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert json.loads((run_dir / "final_eval.json").read_text())["ppl_routed"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "tools/prepare_data.py"), "--tokenizer", tiny_model_dir,
                          "--out", str(tmp_path / "x"), str(tmp_path / "missing.txt")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


def test_cache_shards_rank0_prepares_while_the_others_poll(corpus, tokenizer, tmp_path):
    import threading

    results = {}

    def poll():
        try:
            results["poller"] = ts.cached_shards(corpus, str(tmp_path), tokenizer, local_rank=1, poll_s=0.05)
        except SkipGPTError as err:
            results["poller"] = err

    poller = threading.Thread(target=poll)
    poller.start()  # before anything exists: it waits on the file system, not in a collective
    folder = ts.cached_shards(corpus, str(tmp_path), tokenizer, local_rank=0)
    poller.join(30)
    assert results["poller"] == folder and os.path.isfile(os.path.join(folder, "manifest.json"))
    assert ts.cached_shards(corpus, str(tmp_path), tokenizer, local_rank=1) == folder  # ready: no wait
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(SkipGPTError, match="is not UTF-8") as err0:
        ts.cached_shards([str(bad)], str(tmp_path), tokenizer, local_rank=0)
    with pytest.raises(SkipGPTError, match="is not UTF-8") as err1:  # the preparing rank's failure, on a poller
        ts.cached_shards([str(bad)], str(tmp_path), tokenizer, local_rank=1, poll_s=0.05)
    assert str(err0.value) == str(err1.value)


def test_build_data_with_cache_shards_gives_the_raw_path_batches(corpus, tokenizer, tiny_model_dir, tmp_path):
    from skipgpt_dist.config import load_config
    from skipgpt_dist.training.loop import build_data

    def batches(*extra):
        cfg = load_config(str(ROOT / "configs/tiny.yaml"),
                          [f"run_dir={tmp_path / 'run'}", f"data.train_files=[{','.join(corpus)}]",
                           f"data.eval_files=[{corpus[0]}]", "data.seq_len=32", "data.eval_sequences=3",
                           "logging.progress=false", *extra])
        return build_data(cfg, tokenizer)

    (raw, raw_eval), (cached, cached_eval) = batches(), batches("data.cache_shards=true")
    assert isinstance(cached.packed, ts.PackedShards) and torch.equal(raw_eval, cached_eval)
    for _ in range(2):
        for a, b in zip(raw.next_step(), cached.next_step()):
            assert torch.equal(a["input_ids"], b["input_ids"])
    assert len(list((tmp_path / "run" / "data_cache").iterdir())) == 2  # train and eval shard folders


def test_memmap_reader_reads_the_same_rows(shards):
    pread, memmap = (ts.PackedShards(ts.ShardCorpus(shards, reader=r, release_bytes=1 << 20), 40)
                     for r in ("pread", "memmap"))
    index = torch.randperm(len(pread), generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(pread.rows(index), memmap.rows(index))


def test_data_loader_bench_smoke(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.data_loader import loader_bench

    rows = loader_bench([100_000], str(tmp_path), seq_len=256, mbs=4, readers=("pread",))
    assert [r["rank"] for r in rows] == [0, 1]
    assert all(r["tokens"] == 48 * 4 * 256 and r["peak_rss_mb"] > 0 for r in rows)  # 48 steps x mbs 4 x 256
