"""Loader for the skipgpt_mc task (named by `custom_dataset: !function utils.load` in skipgpt_mc.yaml).

lm-eval hands `dataset_kwargs: data_files` to `datasets.load_dataset`, which resolves a relative path against the
current directory, not the YAML's; a `!function` is resolved next to the YAML, so the questions are found wherever
the package is installed and whatever directory lm_eval runs from.
"""
from __future__ import annotations

import json
from pathlib import Path

DATA_FILE = Path(__file__).with_name("skipgpt_mc.jsonl")


def load_questions(path: Path):
    """{"test": Dataset} of a JSON-lines question file ({"question", "choices", "answer"} a line)."""
    import datasets

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load(**_metadata):
    """{"test": Dataset} of the questions; lm-eval passes the task metadata and model_args, which we ignore."""
    return load_questions(DATA_FILE)
