"""The embedded default corpus: text every Python install already has.

Two kinds of documents, read at run time and never downloaded:
  * the standard library's `.py` sources (code with docstrings), one document per file, in sorted
    relative-path order; test suites (`test`/`tests` dirs), `idlelib`, `site-packages`,
    `dist-packages`, `__pycache__`, the build-specific `_sysconfigdata_*.py`, `pydoc_data/topics.py`
    (it is the prose below, as a Python literal), empty files (many `__init__.py`) and any file
    that is not valid UTF-8 are left out;
  * `pydoc_data.topics.topics`: the language reference as prose, one document per topic, in sorted
    topic order.
`corpus_hash()` is the sha256 of the content (names and text), so a run can record exactly which
corpus it trained on; it differs between Python versions, as the content does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import sysconfig
import time
from typing import Any, Iterator

from phi_jax.errors import InputError

_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages",
                        "__pycache__"})
_TOPIC_PREFIX = "pydoc_data.topics:"
_META_FILE = "phi_jax_tokenizer.json"
_LOG = logging.getLogger(__name__)


def stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _skip_file(rel: pathlib.PurePosixPath) -> bool:
    return rel.name.startswith("_sysconfigdata") or str(rel) == "pydoc_data/topics.py"


@functools.lru_cache(maxsize=1)
def document_names() -> tuple[str, ...]:
    """Names of the corpus documents in corpus order: stdlib-relative paths, then topic keys."""
    root = stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = pathlib.Path(dirpath, name)
            rel = pathlib.PurePosixPath(path.relative_to(root).as_posix())
            if _skip_file(rel):
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # Unreadable or not UTF-8: not part of the corpus.
            if text.strip():  # Empty __init__.py files are not documents.
                files.append(str(rel))
    topics = [_TOPIC_PREFIX + key for key in sorted(_topics())]
    return tuple(sorted(files)) + tuple(topics)


def _topics() -> dict[str, str]:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
    return topics.topics


def read_document(name: str, root: pathlib.Path | None = None) -> str:
    """Text of a corpus document; `root` (the stdlib dir) saves a sysconfig lookup per call."""
    if name.startswith(_TOPIC_PREFIX):
        return _topics()[name[len(_TOPIC_PREFIX):]]
    return ((root or stdlib_dir()) / name).read_bytes().decode("utf-8")


def iter_documents(max_documents: int = 0) -> Iterator[str]:
    """The corpus texts in corpus order (the first `max_documents` when > 0)."""
    names, root = document_names(), stdlib_dir()
    for name in names[:max_documents] if max_documents > 0 else names:
        yield read_document(name, root)


class DefaultCorpusSource:
    """Random-access Grain source over the corpus; records are `{"origin", "data": str}`."""

    def __init__(self, max_documents: int = 0):
        names = document_names()
        self._names = names[:max_documents] if max_documents > 0 else names
        self._root = stdlib_dir()

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self._names[int(index)]
        return {"origin": f"stdlib:{name}", "data": read_document(name, self._root)}


@functools.lru_cache(maxsize=1)
def corpus_hash() -> str:
    """sha256 over every document's name and text, in corpus order."""
    digest, root = hashlib.sha256(), stdlib_dir()
    for name in document_names():
        digest.update(name.encode() + b"\0" + read_document(name, root).encode("utf-8") + b"\0")
    return digest.hexdigest()


def corpus_info() -> dict[str, Any]:
    """Size of the corpus, for run metadata and the README."""
    names = document_names()
    topics = sum(n.startswith(_TOPIC_PREFIX) for n in names)
    return {"documents": len(names), "code_files": len(names) - topics, "topics": topics,
            "characters": sum(len(t) for t in iter_documents()), "sha256": corpus_hash(),
            "stdlib": str(stdlib_dir())}


def get_or_train_tokenizer(workdir: str | os.PathLike, vocab_size: int = 8192):
    """The byte-level BPE tokenizer of the default corpus, trained once and cached in workdir/tokenizer.

    Training sees the whole corpus (about 12 MB of text; a few seconds on 2 cores, so no
    subsampling). The cache is written atomically (temp dir + rename), so concurrent hosts sharing a
    workdir never see a half-written tokenizer; the loser of a race uses the winner's. A cached
    tokenizer with another vocab size is an error rather than silently replaced, since checkpoints in
    the workdir depend on it.
    """
    from phi_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    from phi_jax import fileio  # pylint: disable=g-import-not-at-top
    workdir = fileio.as_path(workdir)  # local, or a bucket (gs://...)
    target = workdir / "tokenizer"
    if not target.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        names = document_names()
        tok = tokenizer_lib.train_bpe(iter_documents(), vocab_size, length=len(names))
        seconds = time.perf_counter() - start
        meta = {"vocab_size": vocab_size, "corpus": "default", "corpus_sha256": corpus_hash(),
                "documents": len(names), "train_seconds": round(seconds, 2)}
        try:
            with fileio.staged_directory(target) as tmp:
                tok.save(tmp)
                (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            _LOG.info("trained %d-token BPE on the default corpus in %.1f s -> %s", vocab_size, seconds,
                      target)
        except (OSError, InputError):
            pass  # Another process won the race; use its tokenizer.
    tok = tokenizer_lib.Tokenizer.from_pretrained(target)
    meta_file = target / _META_FILE
    cached = json.loads(meta_file.read_text()).get("vocab_size") if meta_file.is_file() else None
    if cached is not None and cached != vocab_size:
        raise InputError(f"{target} holds a tokenizer with vocab_size={cached}, but vocab_size="
                         f"{vocab_size} was requested; use another workdir, or delete {target} if no "
                         "checkpoint there depends on it")
    return tok
