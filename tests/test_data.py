"""Data: loading local files, tokenising and packing, and the deterministic rank-sharded batch order."""
from __future__ import annotations

import json

import datasets
import pytest
import torch

from skipgpt_dist.data import PackedBatches, eval_sequences, load_text_dataset, tokenize_and_pack
from skipgpt_dist.errors import SkipGPTError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- loading


def test_load_jsonl_with_custom_field(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", [{"id": i, "content": f"doc {i}\nline two"} for i in range(3)])
    ds = load_text_dataset([f], text_field="content")
    assert ds.column_names == ["text"]
    assert ds["text"] == [f"doc {i}\nline two" for i in range(3)]


def test_load_parquet(tmp_path):
    path = str(tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"body": ["alpha", "beta"], "n": [1, 2]}).to_parquet(path)
    assert load_text_dataset(path, text_field="body")["text"] == ["alpha", "beta"]
    assert load_text_dataset([path], format="parquet", text_field="body").num_rows == 2


def test_load_txt_keeps_documents_whole(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("First play.\n\nACT I\nline\n", encoding="utf-8")
    b.write_text("Second play, caf\u00e9.\n", encoding="utf-8")
    ds = load_text_dataset([str(a), str(b)])
    assert ds["text"] == [a.read_text(), b.read_text()]


def test_load_saved_folder_and_mixed_order(tmp_path):
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"text": ["s1", "s2"], "x": [0, 1]}).save_to_disk(folder)
    one_split = str(tmp_path / "dd")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["d1"]})}).save_to_disk(one_split)
    t = tmp_path / "t.txt"
    t.write_text("plain", encoding="utf-8")
    j = _jsonl(tmp_path / "j.jsonl", [{"text": "j1"}])
    ds = load_text_dataset([str(t), folder, j, one_split, str(t)])
    assert ds["text"] == ["plain", "s1", "s2", "j1", "d1", "plain"]
    assert load_text_dataset([folder], format="dataset")["text"] == ["s1", "s2"]
    with pytest.raises(SkipGPTError, match=r"data file .*t.txt line 1 is not JSON"):
        load_text_dataset([str(t)], format="jsonl")
    with pytest.raises(SkipGPTError, match=r"gone.txt does not exist: fix data.eval_files"):
        load_text_dataset([str(t), str(tmp_path / "gone.txt")], key="data.eval_files")


def test_shakespeare_eval_loads_as_three_documents(shakespeare_eval_files):
    ds = load_text_dataset(shakespeare_eval_files)
    assert ds.num_rows == 3 and ds["text"][0].startswith("HAMLET")


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing", r"data file .*nope.jsonl does not exist: fix data.train_files"),
        ("empty", r"data file .*empty.txt is empty"),
        ("blank", r"data file .*blank.txt holds no text"),
        ("latin1", r"data file .*latin1.txt is not UTF-8 text \(bad byte at offset 3\)"),
        ("latin1_jsonl", r"data file .*latin1.jsonl is not UTF-8"),
        ("no_field", r"data file .*nofield.jsonl has no field 'text' \(its fields: body\): set data.text_field"),
        ("parquet_no_field", r"data file .*p.parquet has no field 'text' \(its fields: body\): set data.text_field"),
        ("not_json", r"data file .*bad.jsonl line 1 is not JSON"),
        ("extension", r"data file .*a.csv has an unknown extension '.csv'"),
        ("folder", r"data folder .* is not a saved dataset"),
        ("two_splits", r"holds splits \['test', 'train'\]: give one split's folder"),
        ("format", r"data.format=xml is unknown: use auto, jsonl, parquet, text or dataset"),
        ("no_files", r"data.train_files is empty"),
    ],
)
def test_bad_inputs_name_the_problem(tmp_path, case, pattern):
    fmt, files = "auto", None
    if case == "missing":
        files = [str(tmp_path / "nope.jsonl")]
    elif case == "empty":
        (tmp_path / "empty.txt").write_bytes(b"")
        files = [str(tmp_path / "empty.txt")]
    elif case == "blank":
        (tmp_path / "blank.txt").write_bytes(b" \n\n\t")
        files = [str(tmp_path / "blank.txt")]
    elif case == "latin1":
        (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
        files = [str(tmp_path / "latin1.txt")]
    elif case == "latin1_jsonl":
        (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
        files = [str(tmp_path / "latin1.jsonl")]
    elif case == "no_field":
        files = [_jsonl(tmp_path / "nofield.jsonl", [{"body": "x"}])]
    elif case == "parquet_no_field":
        datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(tmp_path / "p.parquet"))
        files = [str(tmp_path / "p.parquet")]
    elif case == "not_json":
        (tmp_path / "bad.jsonl").write_text("this is not json\n")
        files = [str(tmp_path / "bad.jsonl")]
    elif case == "extension":
        (tmp_path / "a.csv").write_text("text\nx\n")
        files = [str(tmp_path / "a.csv")]
    elif case == "folder":
        files = [str(tmp_path)]
    elif case == "two_splits":
        d = datasets.Dataset.from_dict({"text": ["x"]})
        datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "dd"))
        files = [str(tmp_path / "dd")]
    elif case == "format":
        fmt, files = "xml", [str(tmp_path / "a.xml")]
    elif case == "no_files":
        files = []
    with pytest.raises(SkipGPTError, match=pattern) as err:
        load_text_dataset(files, format=fmt)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- packing


def test_pack_concatenates_with_eos_and_drops_remainder(tmp_path, tokenizer):
    docs = ["To be, or not to be", "that is the question:", "Whether 'tis nobler in the mind to suffer"]
    ds = load_text_dataset([_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])])
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seq_len = 7
    packed = tokenize_and_pack(ds, tokenizer, seq_len)
    assert len(packed) == len(stream) // seq_len
    rows = packed[:]["input_ids"]
    assert rows.dtype == torch.int64 and rows.shape == (len(stream) // seq_len, seq_len)
    assert rows.flatten().tolist() == stream[: len(packed) * seq_len]
    assert (rows == tokenizer.eos_token_id).sum() >= 2  # eos between the documents
    assert torch.equal(eval_sequences(packed, 2), rows[:2])
    assert torch.equal(eval_sequences(packed, None), rows)
    with pytest.raises(SkipGPTError, match=rf"asked for {len(rows) + 1} sequences.*lower data.eval_sequences"):
        eval_sequences(packed, len(rows) + 1)


def test_pack_too_short(tmp_path, tokenizer):
    ds = load_text_dataset([_jsonl(tmp_path / "d.jsonl", [{"text": "Hi"}])])
    n = len(tokenizer("Hi", add_special_tokens=False)["input_ids"]) + 1
    msg = rf"data: {n} tokens is shorter than one sequence of data.seq_len=64: add text or lower data.seq_len"
    with pytest.raises(SkipGPTError, match=msg):
        tokenize_and_pack(ds, tokenizer, 64)


def test_pack_shakespeare_is_cached_across_tokenizer_loads(shakespeare_eval_files, tiny_model_dir, tokenizer):
    """The same files and tokenizer give the same fingerprint, so ranks and reruns share datasets' cache."""
    from transformers import AutoTokenizer

    ds = load_text_dataset(shakespeare_eval_files)
    a = tokenize_and_pack(ds, tokenizer, 128)
    b = tokenize_and_pack(load_text_dataset(shakespeare_eval_files), AutoTokenizer.from_pretrained(tiny_model_dir), 128)
    assert a._fingerprint == b._fingerprint and len(a) > 500
    assert torch.equal(a[:]["input_ids"], b[:]["input_ids"])


# ---------------------------------------------------------------- batches


def _synthetic(n, seq_len=4):
    """Row i holds i*seq_len .. i*seq_len+seq_len-1, so a row's content names its index."""
    return datasets.Dataset.from_dict({"input_ids": torch.arange(n * seq_len).view(n, seq_len).tolist()})


def _row_index(batch):
    return (batch["input_ids"][:, 0] // batch["input_ids"].shape[1]).tolist()


def _steps(batches, k):
    return [batches.next_step() for _ in range(k)]


def test_batches_shapes_and_determinism():
    packed = _synthetic(50)
    a = _steps(PackedBatches(packed, 2, 3, 1, 0, seed=7), 4)
    b = _steps(PackedBatches(packed, 2, 3, 1, 0, seed=7), 4)
    c = _steps(PackedBatches(packed, 2, 3, 1, 0, seed=8), 4)
    assert len(a[0]) == 3
    m = a[0][0]
    assert m["input_ids"].dtype == torch.int64 and m["input_ids"].shape == (2, 4)
    assert torch.equal(m["attention_mask"], torch.ones(2, 4, dtype=torch.int64))
    assert m["sample_ids"].dtype == torch.int64 and m["sample_ids"].shape == (2,)
    flat = lambda steps: [t for s in steps for mb in s for t in (mb["input_ids"], mb["sample_ids"])]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))
    assert not all(torch.equal(x, y) for x, y in zip(flat(a), flat(c)))


def test_batches_follow_the_seeded_permutation_and_wrap_epochs():
    n = 10  # global batch 4 -> 2 steps per epoch, 2 rows dropped per epoch
    packed = _synthetic(n)
    batches = PackedBatches(packed, 2, 2, 1, 0, seed=3)
    assert batches.steps_per_epoch == 2
    seen = [[(r, int(s)) for mb in st for r, s in zip(_row_index(mb), mb["sample_ids"])] for st in _steps(batches, 6)]
    for epoch in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        rows = seen[2 * epoch] + seen[2 * epoch + 1]
        assert rows == [(perm[p], epoch * n + p) for p in range(8)]
    assert batches.state_dict()["epoch"] == 2


def test_batches_resume_equals_uninterrupted():
    packed = _synthetic(23)
    straight = _steps(PackedBatches(packed, 2, 2, 2, 1, seed=0), 9)  # crosses two epoch ends (2 steps per epoch)
    first = PackedBatches(packed, 2, 2, 2, 1, seed=0)
    head = _steps(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PackedBatches(packed, 2, 2, 2, 1, seed=0)
    resumed.load_state_dict(state)
    tail = _steps(resumed, 4)
    for x, y in zip(straight, head + tail):
        for mx, my in zip(x, y):
            assert torch.equal(mx["input_ids"], my["input_ids"]) and torch.equal(mx["sample_ids"], my["sample_ids"])


def test_rank_shards_union_is_the_single_process_batch():
    packed = _synthetic(40)
    world, mbs, gas = 2, 2, 3
    ranks = [_steps(PackedBatches(packed, mbs, gas, world, r, seed=1), 5) for r in range(world)]
    single = _steps(PackedBatches(packed, mbs * world, gas, 1, 0, seed=1), 5)
    for step in range(5):
        for m in range(gas):
            for key in ("input_ids", "sample_ids", "attention_mask"):
                joined = torch.cat([ranks[r][step][m][key] for r in range(world)])
                assert torch.equal(joined, single[step][m][key])
    ids = [int(s) for r in range(world) for st in ranks[r] for mb in st for s in mb["sample_ids"]]
    assert len(ids) == len(set(ids))  # every row of the run has its own sample id


def test_batches_accept_a_tensor_and_the_packed_dataset(tmp_path, tokenizer):
    ds = load_text_dataset([_jsonl(tmp_path / "d.jsonl", [{"text": "word " * 200}])])
    packed = tokenize_and_pack(ds, tokenizer, 8)
    a = PackedBatches(packed, 2, 1, 1, 0, seed=0).next_step()
    b = PackedBatches(packed[:]["input_ids"], 2, 1, 1, 0, seed=0).next_step()
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"]) and a[0]["input_ids"].dtype == torch.int64


def test_batches_errors():
    with pytest.raises(SkipGPTError, match=r"data: 7 packed sequences are fewer than one global batch of 8"):
        PackedBatches(_synthetic(7), 2, 2, 2, 0, seed=0)
    batches = PackedBatches(_synthetic(8), 1, 1, 1, 0, seed=0)
    with pytest.raises(SkipGPTError, match="had 9 packed sequences, the data now has 8"):
        batches.load_state_dict({"epoch": 0, "index": 0, "num_sequences": 9})
