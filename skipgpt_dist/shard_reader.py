"""Pre-tokenised token shards: tokenise a corpus once, read it lazily on every rank (only the rows it trains on).

    python tools/prepare_data.py --tokenizer MODEL --out data/shards 'corpus/*.jsonl'    # once
    python train.py data.train_files=[data/shards]                                    # format auto-detected

Layout of a shard folder (format version 1):
    manifest.json          tokenizer name + sha256, eos id, dtype, document and token counts, per-source entries
    shard_00000.bin        the source file's tokens (every document + eos), raw little-endian uint16 / uint32
    shard_00000.idx.npy    int64 document boundaries: num_documents + 1 offsets into the .bin, starting at 0
    shard_00000.json       the source's path, size, sha256 and the tokenizer hash it was written with (resume key)

One shard per source file, written to a temporary name and renamed, its .json last: a rerun skips every source
whose shard exists with the same source sha256 and tokenizer hash. Output is a pure function of the inputs
(byte-identical on a rerun). The token stream (shards in source order) equals what ``data.tokenize_and_pack``
concatenates, so packing it into ``seq_len`` rows gives the same rows as the raw-file path.

This module holds what a shard folder is (file names, format version, the tokenizer fingerprint) and reads one;
token_shards.py writes them (and re-exports these names).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from .errors import SkipGPTError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FAULT_AROUND = 1 << 20  # what one memmap read of a few KB may map in (a large page-cache folio)
_FIELDS_IGNORED = ("truncation", "padding")  # runtime settings of a fast tokenizer, not what it encodes to


# ---------------------------------------------------------------- tokenizer identity


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the fast tokenizer's JSON (model, vocab, merges, normalizer,
    pre-tokenizer, added tokens) without padding / truncation settings, plus the eos id appended to documents."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in _FIELDS_IGNORED:
            spec.pop(key, None)
    else:  # a slow tokenizer: its vocabulary and class
        spec = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    spec = {"tokenizer": spec, "eos_token_id": tokenizer.eos_token_id}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    except OSError as err:
        raise SkipGPTError(f"data file {path} cannot be read ({err.strerror or type(err).__name__}): fix its "
                           "permissions or remove it from the inputs") from None
    return digest.hexdigest()


# ---------------------------------------------------------------- finding shard folders


def shard_folder(files, format: str = "auto", key: str = "data.train_files") -> str | None:
    """The shard folder that ``files`` names (one folder holding manifest.json, or the manifest itself), else None.

    ``format=shards`` makes anything else a one-line error."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [os.path.expanduser(os.fspath(f)) for f in files]
    folder = None
    if len(files) == 1:
        path = files[0]
        if os.path.basename(path) == MANIFEST and os.path.isfile(path):
            folder = os.path.dirname(path) or "."
        elif os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
            folder = path
    if folder is None and format == "shards":
        raise SkipGPTError(f"data.format=shards but {key}={files} is not one shard folder with a {MANIFEST}: "
                           "prepare it with tools/prepare_data.py --out FOLDER and give that folder")
    return folder


# ---------------------------------------------------------------- reading


class ShardCorpus:
    """The token stream of a shard folder, read lazily: only the token ranges asked for, no copy of the corpus.

    ``reader="pread"`` (default) reads each range with one positioned read (os.pread) into a fresh array: the OS page
    cache holds the file, this process holds only what it asked for, so memory per rank is flat in the corpus size.
    ``reader="memmap"`` slices np.memmap views instead; a fault there maps in a whole large folio (up to MBs on a
    recent kernel, for a 2 KB row: +190 MB resident after reading 100M tokens in random order), so the mappings are
    dropped after about ``release_bytes`` of faulted pages (each read counts ``_FAULT_AROUND`` at least), which
    bounds the growth but costs a remap every few reads (bench/data_loader.py measures both)."""

    def __init__(self, folder: str, release_bytes: int = 8 << 20, reader: str = "pread"):
        if reader not in ("pread", "memmap"):
            raise ValueError(f"reader={reader!r}: use pread or memmap")
        self.reader = reader
        self.folder = folder
        path = os.path.join(folder, MANIFEST)
        try:
            with open(path, encoding="utf-8") as fh:
                self.manifest = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise SkipGPTError(f"shard manifest {path} cannot be read ({type(err).__name__}): re-run "
                               "tools/prepare_data.py for this folder") from None
        m = self.manifest
        if m.get("format_version") != FORMAT_VERSION:
            raise SkipGPTError(f"shard folder {folder} has format version {m.get('format_version')}, this code "
                               f"reads {FORMAT_VERSION}: re-run tools/prepare_data.py")
        self.dtype = np.dtype(m["dtype"])
        self.sources = m["sources"]
        counts = np.array([s["num_tokens"] for s in self.sources], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # token offset of each shard
        self.num_tokens = int(self.starts[-1])
        self.num_documents = int(m["num_documents"])
        for s in self.sources:
            bin_path = os.path.join(folder, s["shard"] + ".bin")
            expected = s["num_tokens"] * self.dtype.itemsize
            if not os.path.isfile(bin_path) or os.path.getsize(bin_path) != expected:
                raise SkipGPTError(f"shard {bin_path} is missing or not {expected} bytes: re-run "
                                   "tools/prepare_data.py for this folder")
        self.release_bytes = release_bytes
        self._maps: dict[int, np.memmap] = {}
        self._fds: dict[int, int] = {}
        self._read_since_release = 0

    def close(self) -> None:
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):  # a copy (pickle, deepcopy) opens its own files
        return dict(self.__dict__, _maps={}, _fds={})

    def check_tokenizer(self, tokenizer, key: str = "data.train_files") -> None:
        want, name = self.manifest["tokenizer"]["sha256"], self.manifest["tokenizer"]["name"]
        have = tokenizer_fingerprint(tokenizer)
        if have != want:
            raise SkipGPTError(
                f"{key}: shards in {self.folder} were tokenised with {name} (tokenizer sha256 {want[:12]}) but the "
                f"model's tokenizer is {tokenizer_name(tokenizer)} (sha256 {have[:12]}): re-run "
                f"tools/prepare_data.py --tokenizer <the model> or train the model the shards were made for")

    def _map(self, i: int) -> np.memmap:
        if i not in self._maps:
            path = os.path.join(self.folder, self.sources[i]["shard"] + ".bin")
            self._maps[i] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._maps[i]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole stream as int64 (a copy; may span shards)."""
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            if self.starts[i + 1] == self.starts[i]:  # an empty shard
                i += 1
                continue
            lo, hi = int(pos - self.starts[i]), int(min(stop, self.starts[i + 1]) - self.starts[i])
            out[pos - start:pos - start + hi - lo] = self._read(i, lo, hi)
            pos += hi - lo
            i += 1
        return out

    def _read(self, i: int, lo: int, hi: int) -> np.ndarray:
        size = self.dtype.itemsize
        if self.reader == "pread":
            if i not in self._fds:
                if len(self._fds) >= 64:  # a corpus of thousands of shards: keep few files open
                    os.close(self._fds.pop(next(iter(self._fds))))
                self._fds[i] = os.open(os.path.join(self.folder, self.sources[i]["shard"] + ".bin"), os.O_RDONLY)
            buf = os.pread(self._fds[i], (hi - lo) * size, lo * size)
            if len(buf) != (hi - lo) * size:
                raise SkipGPTError(f"shard {self.sources[i]['shard']}.bin in {self.folder} is shorter than its "
                                   "manifest says: re-run tools/prepare_data.py for this folder")
            return np.frombuffer(buf, dtype=self.dtype)
        values = np.array(self._map(i)[lo:hi])
        self._read_since_release += max((hi - lo) * size, _FAULT_AROUND)
        if self._read_since_release >= self.release_bytes:
            self._maps.clear()  # unmaps: the pages read leave this process's resident set
            self._read_since_release = 0
        return values

    def document_offsets(self, i: int) -> np.ndarray:
        """Document boundaries of shard i (int64, num_documents + 1 offsets into that shard)."""
        return np.load(os.path.join(self.folder, self.sources[i]["shard"] + ".idx.npy"), mmap_mode="r")


class PackedShards:
    """A shard corpus as packed ``seq_len`` rows: row i is tokens [i*seq_len, (i+1)*seq_len) of the stream (the
    same exact global packing as ``data.tokenize_and_pack``; the remainder is dropped). ``rows`` reads only the
    rows asked for; ``read_log``, if set to a list, records every row index read (for tests)."""

    def __init__(self, corpus: ShardCorpus, seq_len: int):
        if seq_len < 1:
            raise SkipGPTError(f"data.seq_len={seq_len} must be a positive number of tokens")
        if corpus.num_tokens < seq_len:
            raise SkipGPTError(f"data: {corpus.num_tokens} tokens in {corpus.folder} is shorter than one sequence "
                               f"of data.seq_len={seq_len}: add text or lower data.seq_len")
        self.corpus, self.seq_len = corpus, seq_len
        self.read_log: list[int] | None = None

    def __len__(self) -> int:
        return self.corpus.num_tokens // self.seq_len

    def rows(self, index) -> torch.Tensor:
        index = [int(i) for i in index]
        n, L = len(self), self.seq_len
        out = np.empty((len(index), L), dtype=np.int64)
        for k, i in enumerate(index):
            if not 0 <= i < n:
                raise IndexError(f"row {i} out of range for {n} packed rows")
            out[k] = self.corpus.tokens(i * L, (i + 1) * L)
        if self.read_log is not None:
            self.read_log.extend(index)
        return torch.from_numpy(out)


def open_packed_shards(folder: str, tokenizer, seq_len: int, key: str = "data.train_files") -> PackedShards:
    corpus = ShardCorpus(folder)
    if tokenizer is not None:
        corpus.check_tokenizer(tokenizer, key)
    return PackedShards(corpus, seq_len)
