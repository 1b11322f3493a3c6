"""Helper of scripts/gpu_check.sh.

    python scripts/gpu_check.py assets        # prepare builtin:smollm2-135m, builtin:tiny, the Shakespeare text
    python scripts/gpu_check.py report OUT    # OUT/steps.tsv + logs -> OUT/results.json and OUT/results.md

The report holds, per step: status, exit code, seconds, command, a note (why skipped), and what the step
measured: the bench's JSON record (the last line of its log that is a JSON object with "bench"), the smoke run's
last metrics.jsonl row, the pytest junit counts. The bench records are also folded into one summary
(results.json "bench_summary", results.md "Benchmarks"): one row per bench variant, with where it ran (GPU, dtype,
shape, eager / compiled / CUDA graphs, inference slots) and its headline numbers against the FLOP ideal.
"""
from __future__ import annotations

import json
import platform
import sys
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare_assets() -> None:
    from skipgpt_dist.assets import prepare_smollm2, prepare_tiny, shakespeare_files

    print("builtin:smollm2-135m", prepare_smollm2())
    print("builtin:tiny", prepare_tiny())
    print("builtin:shakespeare-train", len(shakespeare_files("train")), "files")


def read_steps(out: Path) -> list[dict]:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, rc, secs, note, cmd = (line.split("\t") + [""] * 6)[:6]
        steps.append({"name": name, "status": status, "exit_code": int(rc) if rc.lstrip("-").isdigit() else None,
                      "seconds": int(secs or 0), "note": note, "command": cmd})
    return steps


def bench_record(log: Path) -> dict | None:
    if not log.is_file():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and "bench" in data:
                return data
    return None


def smoke_record(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    return {"steps": len(train), "first": train[0] if train else None, "last": train[-1] if train else None}


def junit_counts(path: Path) -> dict | None:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    keys = ("tests", "failures", "errors", "skipped")
    return {k: int(suite.get(k, 0)) for k in keys} | {"time_s": float(suite.get("time", 0))}


def device_info() -> dict:
    info = {"host": platform.node(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception as err:  # the report must still be written
        info["torch_error"] = repr(err)
    return info


# headline columns of each bench's variants in the summary table (row key, column title)
SUMMARY_COLUMNS = {
    "routed_forward": [("forward_ms", "fwd ms"), ("forward_ratio", "fwd x dense"), ("ideal_forward", "ideal"),
                       ("train_ms", "train ms"), ("train_ratio", "train x dense"), ("ideal_train", "ideal"),
                       ("forward_peak_mib", "fwd peak MiB"), ("meets_target", "target")],
    "generate": [("prefill_tok_s", "prefill tok/s"), ("prefill_ratio", "prefill x dense"), ("prefill_ideal", "ideal"),
                 ("decode_tok_s", "decode tok/s"), ("decode_speedup", "decode speedup"),
                 ("decode_ideal_speedup", "ideal"), ("kv_ratio", "KV x dense")],
}


def _run_kind(record: dict) -> str:
    if record.get("compile"):
        return "compile" + (f" ({record['compile_mode']})" if record.get("compile_mode") else "")
    return "eager"


def bench_summary(steps: list[dict]) -> list[dict]:
    """One row per variant of every bench record: where it ran and its headline numbers."""
    rows = []
    for s in steps:
        record = s.get("record")
        if not record:
            continue
        where = {"step": s["name"], "bench": record.get("bench"), "device": record.get("device_name") or
                 record.get("device"), "dtype": record.get("dtype"), "shape": record.get("shape") or
                 record.get("model"), "run": _run_kind(record), "inference_slots": record.get("inference_slots"),
                 "torch": record.get("torch")}
        for v in record.get("variants", []):
            cols = SUMMARY_COLUMNS.get(record.get("bench"), [])
            rows.append(where | {"variant": v.get("variant")} | {key: v[key] for key, _ in cols if key in v})
    return rows


def summary_markdown(rows: list[dict]) -> list[str]:
    lines = []
    for bench, title in (("routed_forward", "Routed vs dense forward and router-training step"),
                         ("generate", "Prefill and batch-1 decode")):
        mine = [r for r in rows if r["bench"] == bench]
        if not mine:
            continue
        cols = [(k, t) for k, t in SUMMARY_COLUMNS[bench] if any(k in r for r in mine)]
        head = ["step", "shape", "dtype", "run", "slots", "variant"] + [t for _, t in cols]
        lines += ["", f"### {title}", "", "| " + " | ".join(head) + " |",
                  "|" + " --- |" * 6 + " ---: |" * len(cols)]
        for r in mine:
            cells = [r["step"], r["shape"], r["dtype"], r["run"], r["inference_slots"], r["variant"]]
            cells += [r.get(k, "") for k, _ in cols]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if lines:
        devices = sorted({str(r["device"]) for r in rows})
        lines = ["", "## Benchmarks", "", "Device: " + ", ".join(devices) + "; x dense = median time over the "
                 "median dense time of the same run (compiled rows: over compiled dense); ideal = FLOP ratio."] + lines
    return lines


def _cell(value) -> str:
    if isinstance(value, bool):
        return "ok" if value else "MISS"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(result: dict) -> str:
    lines = [f"# GPU check {result['started']}", "",
             ", ".join(f"{k} {v}" for k, v in result["device"].items()), "",
             "| step | status | exit | s | note / result |", "| --- | --- | ---: | ---: | --- |"]
    for s in result["steps"]:
        note = s["note"]
        if s.get("smoke") and s["smoke"].get("last"):
            last = s["smoke"]["last"]
            note = f"{s['smoke']['steps']} steps, last loss {last.get('loss', float('nan')):.4f}"
        elif s.get("pytest"):
            p = s["pytest"]
            note = f"{p['tests']} tests, {p['failures']} failed, {p['errors']} errors, {p['skipped']} skipped"
        elif s.get("record"):
            r = s["record"]
            note = (f"{r.get('device_name', r.get('device'))}, {r.get('dtype')}, {r.get('shape') or r.get('model')}, "
                    f"{_run_kind(r)}, {len(r.get('variants', []))} variants")
        lines.append(f"| {s['name']} | {s['status']} | {_cell(s['exit_code'] if s['exit_code'] is not None else '')} "
                     f"| {s['seconds']} | {_cell(note)} |")
    lines += summary_markdown(result.get("bench_summary", []))
    if any(s.get("record") for s in result["steps"]):
        lines += ["", "## Bench details"]
    for s in result["steps"]:
        record = s.get("record")
        if not record or not record.get("variants"):
            continue
        rows = record["variants"]
        keys = [k for k in dict.fromkeys(k for r in rows for k in r)
                if all(not isinstance(r.get(k), (dict, list)) for r in rows)]
        lines += ["", f"### {s['name']}", "", "`" + s["command"] + "`", "",
                  "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    lines += ["", "Commands and logs: results.json, logs/."]
    return "\n".join(lines) + "\n"


def report(out: Path) -> int:
    steps = read_steps(out)
    for s in steps:
        log = out / "logs" / f"{s['name']}.log"
        s["log"] = str(log.relative_to(out)) if log.is_file() else None
        if s["name"].startswith("bench_"):
            s["record"] = bench_record(log)
        elif s["name"].startswith("smoke_"):
            s["smoke"] = smoke_record(out / s["name"])
        elif s["name"] == "pytest_gpu":
            s["pytest"] = junit_counts(out / "pytest_gpu.xml")
    result = {"started": out.name, "written": datetime.now().isoformat(timespec="seconds"),
              "device": device_info(), "steps": steps, "bench_summary": bench_summary(steps)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    print(f"gpu_check: wrote {out / 'results.json'} and {out / 'results.md'}")
    for s in steps:
        print(f"  {s['name']:<30} {s['status']}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["assets"]:
        prepare_assets()
        return 0
    if argv[:1] == ["report"] and len(argv) == 2:
        return report(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
