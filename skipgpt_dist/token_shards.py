"""Writing pre-tokenised token shards: tokenise a corpus once (tools/prepare_data.py), or raw files once per run
into the run's cache (cached_shards). What a shard folder is and how it is read: shard_reader.py, whose names are
importable from here too.

One shard per source file, written to a temporary name and renamed, its .json last: a rerun skips every source
whose shard exists with the same source sha256 and tokenizer hash. Output is a pure function of the inputs
(byte-identical on a rerun).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections import deque
from itertools import chain

import numpy as np

from .errors import SkipGPTError
from .shard_reader import (FORMAT_VERSION, MANIFEST, PackedShards, ShardCorpus, file_sha256,  # noqa: F401
                           open_packed_shards, shard_folder, token_dtype, tokenizer_fingerprint, tokenizer_name)

# ---------------------------------------------------------------- writing


def _iter_documents(path: str, fmt: str, field: str):
    """(text, bytes of the source consumed) per document, streamed (a jsonl line, a parquet batch at a time)."""
    if fmt == "text":
        with open(path, encoding="utf-8") as fh:  # universal newlines, like the datasets text reader
            yield fh.read(), os.path.getsize(path)
        return
    if fmt == "json":
        with open(path, "rb") as fh:
            first = fh.read(4096).lstrip()
        if not first.startswith(b"["):
            with open(path, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if not raw.strip():
                        yield None, len(raw)
                        continue
                    try:
                        record = json.loads(raw)
                    except json.JSONDecodeError as err:
                        raise SkipGPTError(f"data file {path} line {lineno} is not JSON ({err.msg}): give one "
                                           "JSON object per line") from None
                    text = record.get(field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise SkipGPTError(f"data file {path} line {lineno} has no text field {field!r}: fix the "
                                           "data or set data.text_field / --text-field")
                    yield text, len(raw)
            return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        size, rows = os.path.getsize(path), max(pf.metadata.num_rows, 1)
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            texts = batch.column(0).to_pylist()
            if any(t is None for t in texts):
                raise SkipGPTError(f"records of {path} lack field {field!r}: fix the data or set --text-field")
            for t in texts:
                yield t, size / rows
        return
    # a JSON array file or a saved datasets folder: through data.py's reader (memory-mapped Arrow)
    from .data import load_text_dataset

    ds = load_text_dataset([path], "dataset" if fmt == "dataset" else "jsonl", field)
    size = _path_size(path)
    for batch in ds.iter(batch_size=1024):
        for t in batch["text"]:
            yield t, size / max(len(ds), 1)


def _path_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


_WORKER_TOKENIZER = None


def _init_worker(tokenizer):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode(args):
    """Token ids of a batch of documents (eos appended to each): (flat tokens as dtype, per-document lengths)."""
    texts, eos, dtype = args
    ids = _WORKER_TOKENIZER(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    flat = np.fromiter(chain.from_iterable(x + [eos] for x in ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _batches(docs, bar, batch_docs: int, batch_chars: int):
    texts, chars = [], 0
    for text, consumed in docs:
        if bar is not None:
            bar.update(consumed)
        if text:  # empty documents are skipped, as tokenize_and_pack does
            texts.append(text)
            chars += len(text)
        if len(texts) >= batch_docs or chars >= batch_chars:
            yield texts
            texts, chars = [], 0
    if texts:
        yield texts


def _tmp(path: str) -> str:
    """A temporary name beside ``path``, private to this process (writers on several nodes may share a folder)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _replace_atomic(tmp: str, final: str) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def _write_json(path: str, obj) -> None:
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    _replace_atomic(tmp, path)


class _ShardWriter:
    """One source file's shard: tokens appended to a private temporary file, renamed into place on finish."""

    def __init__(self, out: str, meta: dict):
        self.out, self.meta, name = out, meta, meta["shard"]
        self.bin_tmp, self.idx_tmp = _tmp(os.path.join(out, name + ".bin")), _tmp(os.path.join(out, name + ".idx.npy"))
        self.fh = open(self.bin_tmp, "wb")
        self.lengths = [np.zeros(1, dtype=np.int64)]

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        self.fh.write(flat.tobytes())
        self.lengths.append(lengths)

    def finish(self) -> dict:
        self.fh.close()
        name = self.meta["shard"]
        offsets = np.cumsum(np.concatenate(self.lengths)).astype(np.int64)
        with open(self.idx_tmp, "wb") as fh:
            np.save(fh, offsets)
        _replace_atomic(self.bin_tmp, os.path.join(self.out, name + ".bin"))
        _replace_atomic(self.idx_tmp, os.path.join(self.out, name + ".idx.npy"))
        meta = dict(self.meta, num_documents=len(offsets) - 1, num_tokens=int(offsets[-1]))
        _write_json(os.path.join(self.out, name + ".json"), meta)  # last: its presence marks the shard complete
        return meta


def _tokenise_into_shards(todo, out, eos, dtype, pool, workers, bar) -> dict:
    """Tokenise the sources of ``todo`` [(path, fmt, field, meta)] into their shards; {shard name: final meta}.

    One ordered stream of document batches across all files (so workers overlap files, even one-document .txt
    files), at most ``2 * workers`` batches in flight; results are written in order, so the output does not
    depend on the number of workers."""
    def tasks():
        for k, (path, fmt, field, _) in enumerate(todo):
            for texts in _batches(_iter_documents(path, fmt, field), bar, 256, 1 << 22):
                yield k, texts
            yield k, None  # this file is done

    writers, done, pending = {}, {}, deque()

    def handle(k, item):
        if k not in writers:
            writers[k] = _ShardWriter(out, todo[k][3])
        if item is None:
            meta = writers.pop(k).finish()
            done[meta["shard"]] = meta
        else:
            writers[k].add(*(item if isinstance(item, tuple) else item.get()))

    def drain(block: bool):
        while pending and (block or not hasattr(pending[0][1], "ready") or pending[0][1].ready()):
            handle(*pending.popleft())

    for k, texts in tasks():
        if texts is None or pool is None:
            pending.append((k, None if texts is None else _encode((texts, eos, dtype))))
        else:
            pending.append((k, pool.apply_async(_encode, ((texts, eos, dtype),))))
        drain(False)
        if len(pending) >= 2 * workers:  # bounded: never more than a few batches of text in flight
            pending[0][1].wait()
            drain(False)
    drain(True)
    return done


def _shard_done(out: str, name: str, meta: dict, itemsize: int) -> dict | None:
    try:
        with open(os.path.join(out, name + ".json"), encoding="utf-8") as fh:
            done = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    if any(done.get(k) != v for k, v in meta.items()):
        return None
    bin_path, idx_path = os.path.join(out, name + ".bin"), os.path.join(out, name + ".idx.npy")
    if not os.path.isfile(idx_path) or not os.path.isfile(bin_path) \
            or os.path.getsize(bin_path) != done["num_tokens"] * itemsize:
        return None
    return done


def prepare_shards(files, out: str, tokenizer, format: str = "auto", text_field: str = "text",
                   num_proc: int = 1, progress: bool = True, key: str = "inputs") -> dict:
    """Tokenise ``files`` (paths, globs, builtin: names) into a shard folder ``out``; returns the manifest.

    Resumable (sources whose shard is complete and matches are skipped) and deterministic."""
    from .assets import resolve_data_files
    from .data import _check_file, _format_of

    files = resolve_data_files(files, key)
    if not files:
        raise SkipGPTError(f"{key} is empty: give files, globs or builtin:shakespeare-train")
    if tokenizer.eos_token_id is None:
        raise SkipGPTError("the tokenizer has no eos token: set tokenizer.eos_token in the model folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SkipGPTError(f"--out {out} is a file: give a folder for the shards")
    typed = []
    for path in files:
        fmt = _format_of(path, format, key)
        field = "text" if fmt == "text" else text_field
        if not os.path.exists(path):
            _check_file(path, fmt, field, key)  # a one-line "does not exist", before any work
        typed.append((path, fmt, field))
    os.makedirs(out, exist_ok=True)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    tok_hash = tokenizer_fingerprint(tokenizer)
    todo, sources = [], []
    for i, (path, fmt, field) in enumerate(typed):
        name = f"shard_{i:05d}"
        meta = {"source": os.path.abspath(path), "size": _path_size(path),
                "sha256": file_sha256(path) if os.path.isfile(path) else _folder_sha256(path),
                "format": fmt, "text_field": field, "tokenizer_sha256": tok_hash, "dtype": dtype.name, "shard": name}
        done = _shard_done(out, name, meta, dtype.itemsize)
        sources.append(done if done is not None else meta)
        if done is None:
            _check_file(path, fmt, field, key)  # empty, not UTF-8, missing field: one line, before any tokenising
            todo.append((i, path, fmt, field, name, meta))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(m["size"] for *_, m in todo), unit="B", unit_scale=True, desc="tokenizing",
                   dynamic_ncols=True)
    pool = None
    workers = max(1, int(num_proc))
    if workers > 1 and todo:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
    else:
        _init_worker(tokenizer)
    try:
        done = _tokenise_into_shards([(path, fmt, field, meta) for _, path, fmt, field, _, meta in todo], out,
                                     tokenizer.eos_token_id, dtype, pool, workers, bar)
        for i, *_, name, _ in todo:
            sources[i] = done[name]
    finally:
        if pool is not None:
            pool.terminate()  # every result was collected (or this is failing): nothing left worth waiting for
            pool.join()
        if bar is not None:
            bar.close()
    num_tokens = sum(s["num_tokens"] for s in sources)
    if num_tokens == 0:
        raise SkipGPTError(f"{key}: the corpus holds no text (0 tokens in {len(files)} files): give files with text")
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": tokenizer_name(tokenizer), "sha256": tok_hash, "vocab_size": vocab_size,
                      "eos_token_id": tokenizer.eos_token_id},
        "dtype": dtype.name, "num_documents": sum(s["num_documents"] for s in sources), "num_tokens": num_tokens,
        "sources": [{k: s[k] for k in ("shard", "source", "size", "sha256", "format", "text_field",
                                       "num_documents", "num_tokens")} for s in sources],
    }
    _write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def _folder_sha256(path: str) -> str:
    digest = hashlib.sha256()
    names = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    for rel in names:
        digest.update(rel.encode() + b"\0" + file_sha256(os.path.join(path, rel)).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- raw files -> shards in the run's cache


def _cache_key(files: list[str], tokenizer, format: str, text_field: str) -> str:
    def stat(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]

    spec = {"files": [stat(f) for f in files], "tokenizer": tokenizer_fingerprint(tokenizer), "format": format,
            "text_field": text_field, "version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_shards(files, cache_root: str, tokenizer, format: str = "auto", text_field: str = "text",
                  key: str = "data.train_files", local_rank: int = 0, num_proc: int = 1, progress: bool = False,
                  poll_s: float = 1.0) -> str:
    """Shard folder of raw ``files`` under ``cache_root``: local rank 0 of each node prepares it (resuming whatever
    an earlier attempt finished), the node's other ranks poll the file system for its manifest (no collective, so
    no watchdog timeout however long tokenising takes). A failure on the preparing rank is written beside the
    shards as one line that the pollers raise too. Every writer writes identical bytes, so nodes sharing one
    file system may prepare the same folder at once."""
    from .assets import resolve_data_files

    resolved = resolve_data_files(files, key)
    missing = [f for f in resolved if not os.path.exists(f)]
    if missing:
        raise SkipGPTError(f"data file {missing[0]} does not exist: fix {key} (paths, globs or builtin:shakespeare-*)")
    folder = os.path.join(cache_root, "shards-" + _cache_key(resolved, tokenizer, format, text_field))
    failed = os.path.join(folder, "FAILED")
    started = time.time()
    if local_rank == 0:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(failed):
            os.remove(failed)
        try:
            prepare_shards(resolved, folder, tokenizer, format, text_field, num_proc, progress, key)
        except SkipGPTError as err:
            with open(_tmp(failed), "w") as fh:
                fh.write(str(err))
            os.replace(_tmp(failed), failed)
            raise
        return folder
    manifest = os.path.join(folder, MANIFEST)
    while not os.path.isfile(manifest):
        if os.path.isfile(failed) and os.path.getmtime(failed) >= started - 60:  # not a stale one of an old run
            with open(failed) as fh:
                raise SkipGPTError(fh.read().strip())
        time.sleep(poll_s)
    return folder
