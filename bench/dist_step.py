"""One training step under each back end, side by side: 1 process, ZeRO-2, ZeRO-3 and FSDP2 at 2 ranks.

Every variant runs the real training loop (train.py's main) as `torchrun --standalone` workers on the same global
batch (1 process: micro_batch_size 2M; 2 ranks: M each), stage 1 (routers train, base frozen), fp32, CPU/gloo.
Reported per variant: median step time over the steps after the first (from metrics.jsonl), tokens/s per rank,
peak resident memory per rank (ru_maxrss, printed by each worker at exit) and parameter elements held per rank
(the engines' report line). ZeRO-3 uses ds_configs/zero3.json with the persistence thresholds at 0 so that every
parameter is partitioned, as a large model would be.

    python bench/dist_step.py            # ~75M-parameter random Llama (built once into --root), seq 128
    python bench/dist_step.py --quick    # builtin:tiny, seq 32 (smoke run, ~1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

RSS_RE = re.compile(r"\[bench rank (\d+)\] maxrss_kb (\d+)")
SMALL_LLAMA = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)  # ~75M


def worker(argv: list[str]) -> int:
    """Inside torchrun: the real train.py main, then this rank's peak RSS."""
    import train

    try:
        code = train.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    rank = os.environ.get("RANK", "0")
    print(f"[bench rank {rank}] maxrss_kb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    return int(code or 0)


def small_llama(cache: Path) -> str:
    """A ~75M-parameter random Llama with the tiny model's tokenizer (vocab 512), saved once."""
    folder = cache / "bench-llama-75m"
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from skipgpt_dist.assets import prepare_tiny

    tiny = prepare_tiny()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    base = json.loads((Path(tiny) / "config.json").read_text())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=base["vocab_size"], eos_token_id=base["eos_token_id"],
                         pad_token_id=base["pad_token_id"], bos_token_id=None, **SMALL_LLAMA)
    model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return str(folder)


def variants(root: Path):
    from dist_helpers import zero3_all_sharded

    return [("1 process", 1, ["parallel.backend=none"], None),
            ("ZeRO-2", 2, [], REPO / "ds_configs" / "zero2.json"),
            ("ZeRO-3", 2, [], zero3_all_sharded(root)),
            ("FSDP2", 2, ["parallel.backend=fsdp2"], None)]


def run_variant(root: Path, name: str, nproc: int, extra: list[str], ds_config, common: list[str], mbs: int):
    from dist_helpers import Run, child_env

    run_dir = root / name.replace(" ", "_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).resolve()), "--worker"]
    if ds_config is not None:
        cmd += ["--ds_config", str(ds_config)]
    cmd += ["--config", str(REPO / "configs" / "base_stage1.yaml"), f"run_dir={run_dir}",
            f"optim.micro_batch_size={mbs * (2 // nproc)}", *common, *extra]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
    run = Run(run_dir, proc.returncode, proc.stdout + proc.stderr)
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.output[-4000:]}")
    tokens_per_step = 2 * mbs * int(next(a for a in common if a.startswith("data.seq_len=")).split("=")[1])
    step_s = statistics.median(tokens_per_step / r["tokens_per_s"] for r in run.metrics()[1:])  # loop's step time
    rss = {int(m.group(1)): int(m.group(2)) for m in RSS_RE.finditer(run.output)}
    held = run.held()
    return {"name": name, "ranks": nproc, "step_s": step_s, "wall_s": time.time() - started,
            "rss_mb": [rss[r] / 1024 for r in sorted(rss)], "held": [held[r][0] for r in sorted(held)],
            "total": next(iter(held.values()))[1] if held else None}


def main() -> int:
    if "--worker" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--worker"]
        return worker(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="builtin:tiny, seq 32")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per rank at 2 ranks")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run, e.g. FSDP2 ZeRO-3")
    parser.add_argument("--root", default="/tmp/skipgpt-bench-dist", help="run folders and the cached model")
    args = parser.parse_args()

    from dist_helpers import write_text_files

    from skipgpt_dist.assets import prepare_tiny, shakespeare_files

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*/metrics.jsonl"):
        old.unlink()
    model = prepare_tiny() if args.quick else small_llama(root)
    seq = args.seq_len or (32 if args.quick else 128)
    files = write_text_files(root / "text", shakespeare_files("train"), chars=60000)
    common = [f"model.path={model}", f"data.seq_len={seq}", f"data.train_files={json.dumps(files)}",
              "data.eval_files=[]", "eval.at_end=false", "logging.progress=false", f"optim.max_steps={args.steps}",
              "optim.warmup_steps=1", "checkpoint.every_steps=0", "checkpoint.resume=never",
              "routers.mode=capacity", "routers.capacity=0.75"]
    global_batch = 2 * args.micro_batch
    results = []
    for name, nproc, extra, ds in variants(root):
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(run_variant(root, name, nproc, extra, ds, common, args.micro_batch))
    tokens = global_batch * seq
    total = next(r["total"] for r in results if r["total"])
    for r in results:
        r["held"] = r["held"] or [total]  # backend none keeps every parameter (LocalEngine prints no report)
    print(f"\nmodel {model} ({total:,} parameter elements), stage 1, fp32, seq {seq}, global batch "
          f"{global_batch} ({tokens} tokens/step), {args.steps} steps, median of steps 2..{args.steps}")
    print(f"{'variant':<10} {'ranks':>5} {'step s':>8} {'tok/s/rank':>11} {'peak RSS MB/rank':>18} "
          f"{'param elems/rank':>18}")
    for r in results:
        rss = "/".join(f"{v:.0f}" for v in r["rss_mb"])
        held = "/".join(f"{v / 1e6:.2f}M" for v in r["held"])
        print(f"{r['name']:<10} {r['ranks']:>5} {r['step_s']:>8.3f} {tokens / r['step_s'] / r['ranks']:>11.0f} "
              f"{rss:>18} {held:>18}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
