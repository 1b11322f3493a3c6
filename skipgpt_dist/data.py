"""Local text files -> tokenised, packed fixed-length sequences -> deterministic, resumable, rank-sharded batches.

    files = resolve_data_files(cfg.data.train_files)     # skipgpt_dist.assets: builtin names and globs
    docs = load_text_dataset(files, cfg.data.format, cfg.data.text_field)    # one row per document, column "text"
    packed = tokenize_and_pack(docs, tokenizer, cfg.data.seq_len)            # column "input_ids", [seq_len] each
    batches = PackedBatches(packed, micro_batch_size, grad_accum_steps, world_size, rank, seed)
    for micro in batches.next_step(): ...                 # grad_accum_steps dicts of LongTensors for this rank

Tokenisation goes through ``Dataset.map`` so ``datasets`` caches it in its own cache (keyed by the files and the
tokenizer); packing is an exact global concatenation (documents joined with eos, remainder dropped).

For corpora too large to tokenise at start-up, ``tools/prepare_data.py`` writes token shards once
(``skipgpt_dist.token_shards``); ``pack_files`` on that folder gives the same rows, read lazily (only the rows a
rank trains on, by positioned reads or np.memmap).
"""
from __future__ import annotations

import codecs
import json
import os
from itertools import groupby

import numpy as np
import torch

from .errors import SkipGPTError
from .shard_reader import PackedShards

_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
_FORMAT_ALIASES = {
    "jsonl": "json", "json": "json", "parquet": "parquet", "text": "text", "txt": "text", "dataset": "dataset",
}
_BATCH_KEYS = "optim.micro_batch_size, optim.grad_accum_steps or the number of ranks"


# ---------------------------------------------------------------- loading


def _format_of(path: str, fmt: str, key: str) -> str:
    if fmt != "auto":
        if fmt == "shards":
            raise SkipGPTError(f"data.format=shards but {path} is not a shard folder: give the folder written by "
                               f"tools/prepare_data.py in {key}, or set data.format=auto")
        if fmt not in _FORMAT_ALIASES:
            raise SkipGPTError(f"data.format={fmt} is unknown: use auto, jsonl, parquet, text or dataset "
                               "(or shards, for a folder written by tools/prepare_data.py)")
        return _FORMAT_ALIASES[fmt]
    if os.path.isdir(path):
        return "dataset"
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise SkipGPTError(
            f"data file {path} has an unknown extension {ext or '(none)'!r}: use .jsonl, .parquet, .txt, "
            f"a folder saved with Dataset.save_to_disk, or set data.format ({key})"
        )
    return _EXTENSIONS[ext]


def _check_utf8(path: str, key: str) -> None:
    """Decode the file in chunks: not UTF-8 or only whitespace is a one-line error."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                raise SkipGPTError(
                    f"data file {path} is not UTF-8 text (bad byte at offset {offset - pending + err.start}): "
                    f"convert it, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            has_text = has_text or bool(text.strip())
            if not chunk:
                break
            offset += len(chunk)
    if not has_text:
        raise SkipGPTError(f"data file {path} holds no text (only whitespace): remove it from {key}")


def _missing_field(path: str, field: str, fields) -> SkipGPTError:
    return SkipGPTError(
        f"data file {path} has no field {field!r} (its fields: {', '.join(map(str, fields)) or 'none'}): "
        f"set data.text_field to the field that holds the text"
    )


def _check_json_first_record(path: str, field: str) -> None:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                break
    if line.lstrip().startswith("["):
        return  # a JSON array file: checked after loading
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise SkipGPTError(f"data file {path} line {lineno} is not JSON ({err.msg}): give one JSON object per line")
    if not isinstance(record, dict):
        raise SkipGPTError(f"data file {path} line {lineno} is not a JSON object: give one object per line")
    if field not in record:
        raise _missing_field(path, field, record)


def _check_parquet(path: str, field: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as err:  # pyarrow raises several types for a bad file
        raise SkipGPTError(
            f"data file {path} is not a parquet file ({type(err).__name__}): fix the file or data.format"
        ) from None
    if field not in names:
        raise _missing_field(path, field, names)


def _check_file(path: str, fmt: str, field: str, key: str) -> None:
    if not os.path.exists(path):
        raise SkipGPTError(f"data file {path} does not exist: fix {key} (paths, globs or builtin:shakespeare-*)")
    if fmt == "dataset":
        if not os.path.isdir(path) or not any(
            os.path.isfile(os.path.join(path, m)) for m in ("dataset_info.json", "state.json", "dataset_dict.json")
        ):
            raise SkipGPTError(
                f"data folder {path} is not a saved dataset (no dataset_info.json): give files or a folder "
                f"written by Dataset.save_to_disk"
            )
        return
    if os.path.isdir(path):
        raise SkipGPTError(f"data file {path} is a folder but data.format={fmt}: give its files or data.format=dataset")
    if os.path.getsize(path) == 0:
        raise SkipGPTError(f"data file {path} is empty: give a file with text or remove it from {key}")
    if fmt in ("text", "json"):
        _check_utf8(path, key)
    if fmt == "json":
        _check_json_first_record(path, field)
    elif fmt == "parquet":
        _check_parquet(path, field)


def _load_group(fmt: str, paths: list[str]):
    import datasets

    if fmt == "dataset":
        parts = []
        for path in paths:
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if len(ds) != 1:
                    raise SkipGPTError(
                        f"data folder {path} holds splits {sorted(ds)}: give one split's folder, e.g. "
                        f"{os.path.join(path, sorted(ds)[0])}"
                    )
                ds = next(iter(ds.values()))
            parts.append(ds)
        return parts
    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    try:
        return [datasets.load_dataset(fmt, data_files=paths, split="train", **kwargs)]
    except SkipGPTError:
        raise
    except Exception as err:  # the builders raise many types; keep the user's view to one line
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"
        raise SkipGPTError(f"could not read data file {where} as {fmt}: {cause}: fix the file or data.format") from err


def _text_column(ds, field: str, where: str):
    import datasets

    if field not in ds.column_names:
        raise _missing_field(where, field, ds.column_names)
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise SkipGPTError(f"data field {field!r} in {where} is {feature}, not text: set data.text_field")
    nulls = ds.data.column(field).null_count
    if nulls:
        raise SkipGPTError(f"{nulls} records of {where} lack field {field!r}: fix the data or set data.text_field")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds


def load_text_dataset(files, format: str = "auto", text_field: str = "text", key: str = "data.train_files"):
    """Load local jsonl / parquet / txt files or saved dataset folders as a ``datasets.Dataset``.

    Returns one row per document with the single column ``text``. A ``.txt`` file is one document.
    ``key`` is the config key the files came from, named in error messages.
    """
    import datasets

    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [os.fspath(f) for f in files]
    if not files:
        raise SkipGPTError(f"{key} is empty: give files, globs or builtin:shakespeare-train")
    typed = [(f, _format_of(f, format, key)) for f in files]
    for path, fmt in typed:
        _check_file(path, fmt, "text" if fmt == "text" else text_field, key)
    parts = []
    for fmt, group in groupby(typed, key=lambda pf: pf[1]):  # consecutive runs keep the file order
        paths = [p for p, _ in group]
        field = "text" if fmt == "text" else text_field
        where = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"
        parts += [_text_column(ds, field, where) for ds in _load_group(fmt, paths)]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ---------------------------------------------------------------- tokenising and packing


def tokenize_and_pack(dataset, tokenizer, seq_len: int):
    """Tokenise every document (eos appended), concatenate, cut into ``seq_len`` rows, drop the remainder.

    Returns a ``datasets.Dataset`` with one column ``input_ids`` (torch format: LongTensor rows).
    """
    import datasets
    import pyarrow as pa
    from datasets.fingerprint import Hasher
    from datasets.table import InMemoryTable

    if seq_len < 1:
        raise SkipGPTError(f"data.seq_len={seq_len} must be a positive number of tokens")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SkipGPTError("the model's tokenizer has no eos token: set tokenizer.eos_token in the model folder")

    def tokenize(batch):
        texts = [t for t in batch["text"] if t]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    tokenized = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, features=features, desc="tokenizing"
    )
    column = tokenized.data.column("input_ids")
    values = [chunk.flatten() for chunk in column.chunks]  # flatten() honours slices/offsets
    values = pa.concat_arrays(values) if values else pa.array([], type=pa.int32())
    total = len(values)
    if total < seq_len:
        raise SkipGPTError(
            f"data: {total} tokens is shorter than one sequence of data.seq_len={seq_len}: "
            f"add text or lower data.seq_len"
        )
    n = total // seq_len
    rows = pa.FixedSizeListArray.from_arrays(values.slice(0, n * seq_len), seq_len)
    packed = datasets.Dataset(
        InMemoryTable(pa.table({"input_ids": rows})), fingerprint=Hasher.hash((tokenized._fingerprint, seq_len))
    )
    return packed.with_format("torch")


def _rows(packed, index) -> torch.Tensor:
    """Rows of a packed dataset (or a [N, L] tensor, or token shards) as a LongTensor [len(index), L]."""
    if isinstance(packed, PackedShards):  # reads only these rows from the memory-mapped shards
        return packed.rows(index)
    if isinstance(packed, torch.Tensor):
        return packed[torch.as_tensor(index, dtype=torch.long)].long()
    arr = packed.with_format("numpy")[list(map(int, index))]["input_ids"]
    return torch.from_numpy(np.asarray(arr, dtype=np.int64))


def eval_sequences(packed, n: int | None) -> torch.Tensor:
    """The first ``n`` packed sequences (all if None), as a LongTensor [n, seq_len]."""
    total = len(packed)
    n = total if n is None else n
    if not 1 <= n <= total:
        raise SkipGPTError(
            f"eval: asked for {n} sequences but the eval data packs into {total}: lower data.eval_sequences "
            f"or add text to data.eval_files"
        )
    return _rows(packed, range(n))


def pack_files(files, tokenizer, seq_len: int, format: str = "auto", text_field: str = "text",
               key: str = "data.train_files"):
    """Text files (paths or builtin: names) -> their packed dataset of seq_len-token sequences.

    A shard folder written by tools/prepare_data.py (or its manifest.json) is read lazily from its memory-mapped
    shards instead (``token_shards.PackedShards``, the same rows), after checking it was made with this tokenizer."""
    from .assets import resolve_data_files
    from .shard_reader import open_packed_shards, shard_folder

    folder = shard_folder(files, format, key)
    if folder is not None:
        return open_packed_shards(folder, tokenizer, seq_len, key)
    return tokenize_and_pack(load_text_dataset(resolve_data_files(files, key), format, text_field, key),
                             tokenizer, seq_len)


def packed_eval_sequences(files, tokenizer, seq_len: int, n: int | None, format: str = "auto",
                          text_field: str = "text", at_most: bool = False) -> torch.Tensor:
    """The first n packed sequences [n, seq_len] of text files, as the tools read them.

    at_most: fewer sequences than n are fine (all of them), instead of an error."""
    packed = pack_files(files, tokenizer, seq_len, format, text_field)
    return eval_sequences(packed, min(n, len(packed)) if at_most and n is not None else n)


# ---------------------------------------------------------------- batches


class PackedBatches:
    """Deterministic, resumable, rank-sharded batches over packed sequences.

    One optimiser step consumes a global batch of ``micro_batch_size * grad_accum_steps * world_size`` rows of
    the epoch's permutation (``torch.randperm`` seeded with ``seed + epoch``). For micro-step m the global
    micro-batch is the next ``world_size * micro_batch_size`` permutation entries; rank r takes rows
    ``[r*mbs, (r+1)*mbs)`` of it. So one process with ``world_size * micro_batch_size`` rows sees the union of all
    ranks' rows in the same order. A partial global batch at an epoch's end is dropped.
    """

    def __init__(self, packed, micro_batch_size: int, grad_accum_steps: int, world_size: int, rank: int, seed: int):
        if min(micro_batch_size, grad_accum_steps, world_size) < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch layout mbs={micro_batch_size} gas={grad_accum_steps} rank={rank}/{world_size}")
        self.packed = packed
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.num_sequences = len(packed)
        self.global_batch_size = micro_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = self.num_sequences // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise SkipGPTError(
                f"data: {self.num_sequences} packed sequences are fewer than one global batch of "
                f"{self.global_batch_size} (micro_batch_size {micro_batch_size} x grad_accum_steps "
                f"{grad_accum_steps} x world_size {world_size}): add text, lower data.seq_len, or lower {_BATCH_KEYS}"
            )
        self.epoch = 0
        self.index = 0  # position in the epoch's permutation where the next global batch starts
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_sequences, generator=gen), epoch
        return self._perm

    def next_step(self) -> list[dict]:
        """This rank's ``grad_accum_steps`` micro-batches for one optimiser step."""
        if self.index + self.global_batch_size > self.num_sequences:
            self.epoch, self.index = self.epoch + 1, 0
        perm = self._permutation(self.epoch)
        mbs, out = self.micro_batch_size, []
        for m in range(self.grad_accum_steps):
            start = self.index + (m * self.world_size + self.rank) * mbs
            positions = torch.arange(start, start + mbs)
            ids = _rows(self.packed, perm[positions].tolist())
            out.append(
                {
                    "input_ids": ids,
                    "attention_mask": torch.ones_like(ids),
                    "sample_ids": positions + self.epoch * self.num_sequences,
                }
            )
        self.index += self.global_batch_size
        return out

    def peek_sequences(self, count: int) -> torch.Tensor:
        """The next `count` sequences of this rank's stream (count, seq_len), leaving the data position as it was
        (for calibration passes that must not change what training sees)."""
        state = self.state_dict()
        sequences = []
        while sum(len(s) for s in sequences) < count:
            sequences += [micro["input_ids"] for micro in self.next_step()]
        self.load_state_dict(state)
        return torch.cat(sequences)[:count]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "num_sequences": self.num_sequences, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_sequences", self.num_sequences) != self.num_sequences:
            raise SkipGPTError(
                f"resume: the checkpoint's data had {state['num_sequences']} packed sequences, the data now has "
                f"{self.num_sequences}: resume with the same data.train_files and data.seq_len"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
