"""Writes that never lose anything: atomic files, directories published whole, no silent overwrite.

Every command that writes an output goes through these, so the same guarantees hold everywhere:
  * `atomic_write_text` / `atomic_write_json`: a reader sees the old file or the new one, never
    half of one (write to a temporary sibling, fsync, rename);
  * `staged_directory(dst, overwrite=...)`: build a whole directory in a temporary sibling and
    rename it into place when complete. A directory that already holds something is refused
    unless `overwrite=True`, and even then the old one is only removed after the new one is in
    place, so a crash at any moment leaves either the old output or the new one, whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from phi_jax.errors import InputError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def is_nonempty_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.iterdir())


def check_writable_output(path: str | os.PathLike, *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse an existing non-empty output (or a file where a directory goes) unless `overwrite`."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{p} exists and is a file, not a directory; choose another output path")
    if is_nonempty_dir(p) and not overwrite:
        raise InputError(f"{p} already exists and is not empty; choose a new output directory, or "
                         f"pass {flag} to replace it (the old one is removed only once the new one "
                         "is complete)")


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, *, overwrite: bool = False,
                     flag: str = "--overwrite") -> Iterator[Path]:
    """Yield a temporary sibling of `dst` to fill; on success it replaces `dst` in one rename.

    On an exception the temporary directory is removed and `dst` is untouched.
    """
    dst = Path(dst)
    check_writable_output(dst, overwrite=overwrite, flag=flag)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        publish_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(src: Path, dst: Path) -> None:
    """Move the complete directory `src` to `dst`; an existing `dst` is set aside first and
    deleted only after the new one is in place."""
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if dst.exists():
            dst.rmdir()
        os.replace(src, dst)
