"""The teacher's answers on disk, keyed by what was asked, written before an answer is used.

Why sqlite (WAL): one file that several worker processes and threads write at once (sqlite
serialises writers with its own locks; `busy_timeout` makes them wait instead of failing), each
answer committed in its own transaction, so a run killed with SIGKILL one instruction after the
commit still has it and one killed before has nothing half-written; lookups are an index probe,
not a scan of journals. `synchronous=FULL` also survives a power cut, at one fsync per answer,
which is nothing next to a teacher's latency. Append-only journals would need their own index,
merging and torn-line handling to give the same guarantees.

The key (see `cache_key`) covers the prompt template, the model, the sampling settings and the
rendered messages (which hold the input); the teacher's URL is not part of it, so the same model
behind another address reuses the answers.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from phi_jax.errors import InputError

_SCHEMA = """CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL)"""


def cache_key(*, template_sha256: str, model: str, sampling: dict[str, Any],
              messages: list[dict[str, str]]) -> str:
    """sha256 of the canonical JSON of everything that determines an answer."""
    blob = json.dumps({"v": 1, "template": template_sha256, "model": model, "sampling": sampling,
                       "messages": messages}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class TeacherCache:
    """get(key) -> answer dict or None; put(key, model, answer) commits before returning."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise InputError(f"teacher cache {self.path} is not a usable sqlite database ({e}); move it "
                             "away and rerun (the answers in it will be asked again)") from None

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, model: str, answer: dict[str, Any]) -> None:
        blob = json.dumps(answer, ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)",
                             (key, model, blob, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
