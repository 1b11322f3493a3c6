"""Tokenise a corpus once into memory-mapped token shards that every rank of a training run reads lazily.

    python tools/prepare_data.py --tokenizer builtin:smollm2 --out data/plays builtin:shakespeare-train
    python tools/prepare_data.py --tokenizer /models/llama --out data/web 'corpus/*.jsonl' --text-field content -j 16
    python train.py --config configs/smollm2_stage1.yaml data.train_files=[data/web]

Inputs: .jsonl / .parquet / .txt files, globs, saved `datasets` folders or builtin:shakespeare-*. One shard per
input file (uint16 tokens when the vocabulary fits, else uint32), an int64 index of document boundaries, and
manifest.json (tokenizer name + hash, counts, dtype, sources with sizes and sha256). Interrupted? Run the same
command again: finished shards are kept. The same inputs give byte-identical output. Prints the manifest summary
as one JSON line.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipgpt_dist.errors import run_cli  # noqa: E402


@run_cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="files, globs, datasets folders or builtin:shakespeare-train")
    parser.add_argument("--out", required=True, help="shard folder to write (created; reruns resume into it)")
    parser.add_argument("--tokenizer", required=True,
                        help="model folder (or builtin:tiny / builtin:smollm2) whose tokenizer to use: the model "
                             "you will train")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "text", "dataset"])
    parser.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet records")
    parser.add_argument("-j", "--num-proc", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="tokeniser worker processes (default: cores - 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)

    from skipgpt_dist.assets import resolve_model_path
    from skipgpt_dist.token_shards import prepare_shards
    from skipgpt_dist.training.model_setup import load_tokenizer

    from skipgpt_dist.errors import SkipGPTError

    where = resolve_model_path(args.tokenizer) if args.tokenizer.startswith("builtin:") else args.tokenizer
    if not os.path.isdir(os.path.expanduser(where)):
        raise SkipGPTError(f"--tokenizer {args.tokenizer} is not a folder: give the model folder you will train "
                           "(or builtin:tiny / builtin:smollm2)")
    tokenizer = load_tokenizer(os.path.expanduser(where), args.trust_remote_code)
    manifest = prepare_shards(args.inputs, args.out, tokenizer, args.format, args.text_field, args.num_proc,
                              progress=not args.no_progress, key="inputs")
    print(json.dumps({"out": args.out, "documents": manifest["num_documents"], "tokens": manifest["num_tokens"],
                      "dtype": manifest["dtype"], "shards": len(manifest["sources"]),
                      "tokenizer": manifest["tokenizer"]["name"]}))


if __name__ == "__main__":
    main()
