"""One bench, two source trees, side by side: does a refactor keep the speed ratios of the previous main?

Runs `bench/routed_forward.py` and/or `bench/generate.py` alternately in this tree and in a base tree (a checkout
of the previous main: `git worktree add /tmp/base <commit>`), --rounds times each (A B A B ...: both see the same
machine load), reads each run's JSON record and prints, per variant, the ratio metrics of both trees (medians over
rounds) and new / base. The ratios are against each tree's own dense model in the same run, so the comparison does
not depend on absolute speed.

    git worktree add /tmp/base c3c28e6
    python bench/compare_trees.py --base /tmp/base --rounds 2 -- --quick
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from skipgpt_dist.errors import SkipGPTError, run_cli  # noqa: E402

# per bench: the JSON flag it needs and the ratio metrics compared (each against its own dense in that run)
BENCHES = {"routed_forward": ([], ["forward_ratio", "train_ratio"]),
           "generate": (["--json"], ["prefill_ratio", "decode_speedup"])}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="source tree of the previous main (a git worktree)")
    p.add_argument("--benches", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    p.add_argument("--rounds", type=int, default=2, help="runs per tree, alternating (default 2)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: flags passed to every bench run")
    args = p.parse_args(argv)
    base = Path(args.base)
    for bench in args.benches:
        if not (base / "bench" / f"{bench}.py").is_file():
            raise SkipGPTError(f"--base {base} has no bench/{bench}.py: point it at a checkout of the previous main "
                               "(git worktree add /tmp/base <commit>)")
    if args.rounds < 1:
        raise SkipGPTError(f"--rounds {args.rounds} must be >= 1")
    args.bench_args = [a for a in args.bench_args if a != "--"]
    return args


def run_bench(tree: Path, bench: str, extra: list[str]) -> dict:
    flags, _ = BENCHES[bench]
    proc = subprocess.run([sys.executable, f"bench/{bench}.py", *flags, *extra], cwd=tree, text=True,
                          capture_output=True)
    records = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not records:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SkipGPTError(f"bench/{bench}.py failed in {tree} (exit {proc.returncode}): {tail[0]}")
    return json.loads(records[-1])


def compare(bench: str, runs: dict[str, list[dict]]) -> list[str]:
    _, metrics = BENCHES[bench]
    # noise: the largest max / min - 1 of one tree's own rounds, so a new / base further from 1 than it is a change
    lines = [f"\n## {bench}: median over {len(runs['new'])} round(s) per tree",
             "| variant | " + " | ".join(f"{m} base | {m} new | new / base | noise" for m in metrics) + " |",
             "| --- |" + " ---: | ---: | ---: | ---: |" * len(metrics)]
    variants = [row["variant"] for row in runs["new"][0]["variants"]]
    for name in variants:
        cells = []
        for metric in metrics:
            values = {tree: [row[metric] for rec in recs for row in rec["variants"]
                             if row["variant"] == name and metric in row] for tree, recs in runs.items()}
            if not values["base"] or not values["new"]:
                cells.append("- | - | - | -")
                continue
            base, new = statistics.median(values["base"]), statistics.median(values["new"])
            noise = max(max(v) / min(v) for v in values.values()) - 1
            cells.append(f"{base:.3f} | {new:.3f} | {new / base:.3f} | {noise:.1%}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


@run_cli
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    trees = {"base": Path(args.base).resolve(), "new": ROOT}
    out = []
    for bench in args.benches:
        runs: dict[str, list[dict]] = {"base": [], "new": []}
        for round_ in range(args.rounds):
            for tree, path in trees.items():
                print(f"[compare] {bench} round {round_ + 1}/{args.rounds}: {tree} ({path})", flush=True)
                runs[tree].append(run_bench(path, bench, args.bench_args))
        out += compare(bench, runs)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
