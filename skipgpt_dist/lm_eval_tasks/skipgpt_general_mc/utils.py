"""Loader for the skipgpt_general_mc task (`custom_dataset: !function utils.load`; see skipgpt_mc/utils.py for why
the questions are found next to this file rather than through `data_files`)."""
from __future__ import annotations

from pathlib import Path

from skipgpt_dist.lm_eval_tasks.skipgpt_mc.utils import load_questions

DATA_FILE = Path(__file__).with_name("skipgpt_general_mc.jsonl")


def load(**_metadata):
    """{"test": Dataset} of the questions; lm-eval passes the task metadata and model_args, which we ignore."""
    return load_questions(DATA_FILE)
