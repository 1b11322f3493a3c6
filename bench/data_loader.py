"""Data loading at scale: the lazy shard loader per rank, and tokenisation throughput of prepare_data.

    python bench/data_loader.py            # 1M / 10M / 100M-token synthetic corpora, 2 ranks; shakespeare-train
    python bench/data_loader.py --quick    # small sizes (smoke test)

Part 1 writes synthetic uint16 token shards (random tokens, a document every ~1000 tokens; no tokenizer) and
starts 2 fresh processes (spawn) as ranks 0 and 1 of world size 2, once per reader (pread, the default, and
memmap; see token_shards.ShardCorpus). Each reads one full epoch of its rows through
PackedBatches over PackedShards (seq_len 1024, micro-batch 8) and reports tokens/s and its peak RSS
(VmHWM, which counts the memory-mapped file pages a process has mapped in). Flat RSS across sizes = no corpus copy.
Part 2 tokenises the same real files (builtin:shakespeare-train) with prepare_shards (1 and N workers) and with a
plain batched ``datasets.map`` of the tokenizer (caching off), side by side. Prints a table and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def write_synthetic_shards(folder: str, num_tokens: int, seed: int = 0, vocab: int = 50000,
                           doc_tokens: int = 1000) -> None:
    """A shard folder of random uint16 tokens in the prepare_data layout (one shard), written in 8M-token chunks."""
    from skipgpt_dist import token_shards as ts

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(folder, "shard_00000.bin"), "wb") as fh:
        for start in range(0, num_tokens, 8 << 20):
            fh.write(rng.integers(0, vocab, min(8 << 20, num_tokens - start), dtype=np.uint16).tobytes())
    offsets = np.append(np.arange(0, num_tokens, doc_tokens, dtype=np.int64), np.int64(num_tokens))
    np.save(os.path.join(folder, "shard_00000.idx.npy"), offsets)
    manifest = {"format_version": ts.FORMAT_VERSION,
                "tokenizer": {"name": "synthetic", "sha256": "synthetic", "vocab_size": vocab, "eos_token_id": 0},
                "dtype": "uint16", "num_documents": len(offsets) - 1, "num_tokens": num_tokens,
                "sources": [{"shard": "shard_00000", "source": "synthetic", "size": 0, "sha256": "",
                             "format": "synthetic", "text_field": "", "num_documents": len(offsets) - 1,
                             "num_tokens": num_tokens}]}
    with open(os.path.join(folder, ts.MANIFEST), "w") as fh:
        json.dump(manifest, fh)


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM (peak) of this process image from /proc (ru_maxrss would carry the launcher's peak over)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rank_worker(folder: str, rank: int, world: int, seq_len: int, mbs: int, reader: str, queue) -> None:
    import torch

    from skipgpt_dist.data import PackedBatches
    from skipgpt_dist.token_shards import PackedShards, ShardCorpus

    torch.set_num_threads(1)
    rss_start = _status_mb("VmRSS")
    batches = PackedBatches(PackedShards(ShardCorpus(folder, reader=reader), seq_len), mbs, 1, world, rank, seed=0)
    tokens, checksum, start = 0, 0, time.perf_counter()
    for _ in range(batches.steps_per_epoch):
        for micro in batches.next_step():
            tokens += micro["input_ids"].numel()
            checksum += int(micro["input_ids"][:, 0].sum())
    seconds = time.perf_counter() - start
    queue.put({"reader": reader, "rank": rank, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
               "rss_start_mb": rss_start, "peak_rss_mb": _status_mb("VmHWM"), "checksum": checksum})


def loader_bench(sizes, root: str, seq_len: int = 1024, mbs: int = 8, world: int = 2,
                 readers=("pread", "memmap")) -> list[dict]:
    ctx, rows = mp.get_context("spawn"), []
    for size in sizes:
        folder = os.path.join(root, f"synthetic_{size}")
        write_synthetic_shards(folder, size)
        for reader in readers:
            queue = ctx.Queue()
            procs = [ctx.Process(target=_rank_worker, args=(folder, r, world, seq_len, mbs, reader, queue))
                     for r in range(world)]
            for p in procs:
                p.start()
            results = sorted((queue.get(timeout=600) for _ in procs), key=lambda r: r["rank"])
            for p in procs:
                p.join()
                if p.exitcode != 0:
                    raise SystemExit(f"rank process failed with exit code {p.exitcode}")
            rows += [dict(r, corpus_tokens=size) for r in results]
        shutil.rmtree(folder)
    return rows


def tokenise_bench(files: list[str], tokenizer, workers: int, root: str) -> list[dict]:
    import datasets

    from skipgpt_dist.data import load_text_dataset
    from skipgpt_dist.token_shards import prepare_shards

    mb = sum(os.path.getsize(f) for f in files) / 1e6
    rows = []
    for n in sorted({1, workers}):
        out = os.path.join(root, f"prep_{n}")
        start = time.perf_counter()
        manifest = prepare_shards(files, out, tokenizer, num_proc=n, progress=False)
        seconds = time.perf_counter() - start
        rows.append({"method": "prepare_data (shards)", "workers": n, "seconds": seconds,
                     "tokens": manifest["num_tokens"], "tokens_per_s": manifest["num_tokens"] / seconds,
                     "mb_per_s": mb / seconds})
        shutil.rmtree(out)
    datasets.disable_caching()
    datasets.disable_progress_bars()
    eos = tokenizer.eos_token_id

    def tok(batch):
        ids = tokenizer([t for t in batch["text"] if t], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    for n in sorted({1, workers}):
        start = time.perf_counter()
        docs = load_text_dataset(files)
        mapped = docs.map(tok, batched=True, remove_columns=["text"], num_proc=None if n == 1 else n,
                          load_from_cache_file=False)
        tokens = sum(len(x) for x in mapped["input_ids"])
        seconds = time.perf_counter() - start
        rows.append({"method": "datasets.map (in-memory Arrow)", "workers": n, "seconds": seconds, "tokens": tokens,
                     "tokens_per_s": tokens / seconds, "mb_per_s": mb / seconds})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: 200k / 1M tokens, 2 plays")
    parser.add_argument("--tokenizer", default="builtin:tiny", help="tokenizer for part 2 (a model folder too)")
    parser.add_argument("--workers", type=int, default=2, help="parallel tokeniser workers in part 2")
    parser.add_argument("--only", choices=["loader", "tokenise"], help="run one part")
    args = parser.parse_args(argv)

    from skipgpt_dist.assets import resolve_data_files, resolve_model_path
    from skipgpt_dist.training.model_setup import load_tokenizer

    sizes = [200_000, 1_000_000] if args.quick else [1_000_000, 10_000_000, 100_000_000]
    files = resolve_data_files("builtin:shakespeare-train")
    files = files[:2] if args.quick else files
    tokenizer = load_tokenizer(resolve_model_path(args.tokenizer), False)
    root = tempfile.mkdtemp(prefix="skipgpt-data-bench-")
    try:
        loader = loader_bench(sizes, root) if args.only != "tokenise" else []
        tokenise = tokenise_bench(files, tokenizer, args.workers, root) if args.only != "loader" else []
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print("\nlazy shard loader, 2 ranks, seq_len 1024, micro-batch 8, one epoch each")
    print(f"{'corpus tokens':>14} {'reader':>6} {'rank':>4} {'tokens read':>12} {'s':>7} {'tokens/s':>12} "
          f"{'RSS start MB':>12} "
          f"{'peak RSS MB':>11}")
    for r in loader:
        print(f"{r['corpus_tokens']:>14,} {r['reader']:>6} {r['rank']:>4} {r['tokens']:>12,} {r['seconds']:>7.2f} "
              f"{r['tokens_per_s']:>12,.0f} {r['rss_start_mb']:>12.0f} {r['peak_rss_mb']:>11.0f}")
    by_rank = {}
    for r in loader:
        by_rank.setdefault(f"{r['reader']} rank {r['rank']}", []).append(r["peak_rss_mb"])
    ratios = {key: v[-1] / v[0] for key, v in by_rank.items()}
    if ratios:
        print("peak RSS largest / smallest corpus: " + ", ".join(f"{k} {v:.3f}x" for k, v in sorted(ratios.items())))
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    if tokenise:
        print_tokenise(tokenise, files, mb, tokenizer)
    print(json.dumps({"loader": loader, "rss_ratio": ratios, "tokenise": tokenise}))


def print_tokenise(tokenise, files, mb, tokenizer):
    print(f"\ntokenisation of {len(files)} files ({mb:.1f} MB), tokenizer {tokenizer.name_or_path}")
    print(f"{'method':<32} {'workers':>7} {'s':>7} {'tokens':>11} {'tokens/s':>11} {'MB/s':>6}")
    for r in tokenise:
        print(f"{r['method']:<32} {r['workers']:>7} {r['seconds']:>7.2f} {r['tokens']:>11,} "
              f"{r['tokens_per_s']:>11,.0f} {r['mb_per_s']:>6.2f}")


if __name__ == "__main__":
    main()
