"""Paths and writes that never lose anything: local disks and buckets (`gs://`) alike.

One path abstraction: `as_path(p)` is a `pathlib.Path` for a local path and an `etils.epath.Path`
for a URL (`gs://`, `s3://`, `az://`), so code that joins, lists, reads and writes paths runs
unchanged on either. gs:// goes through gcsfs (fsspec), the same client Orbax's directory handling
uses: `import phi_jax` sets `EPATH_USE_TF=false` (unless the user set it), because epath otherwise
switches to TensorFlow's gfile whenever tensorflow is importable (tensorflow-datasets can pull it
in), and then phi_jax and Orbax would talk to the bucket through two clients with different
credentials, retries and emulator support. Credentials are Google's usual ones (Application
Default Credentials); nothing here is phi_jax-specific. Directory listings are never cached
(`_configure_clients`): other processes write the same bucket.

Every command that writes an output goes through these, so the same guarantees hold everywhere:
  * `atomic_write_text` / `atomic_write_json`: a reader sees the old file or the new one, never
    half of one. Locally: a temporary sibling, fsync, rename. On a bucket: one object upload, which
    the store makes visible only once it is complete (objects have no partial state).
  * `staged_directory(dst, overwrite=...)`: build a whole directory in a temporary place and
    publish it when complete. A directory that already holds something is refused unless
    `overwrite=True`. Locally the temporary directory is a sibling renamed into place, and an old
    output is removed only after the new one is in place, so a crash at any moment leaves either
    the old output or the new one, whole. A bucket has no directory rename, so the staged files
    are uploaded and the directory's *publishing objects* (`PUBLISH_LAST`: config.json,
    manifest.json, the tokenizer files) go last: a reader, and a resume, only take a directory for
    done when its publishing object exists, so a crash mid-upload leaves an output nothing uses.
    Replacing an old remote output removes its publishing objects first, for the same reason.
  * `local_copy(p)`: a remote file or directory fetched into a local cache, for the libraries that
    need a real file (safetensors, GGUF memory maps, tokenizers, sentencepiece).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

from phi_jax.errors import DependencyError, InputError, MissingFileError

AnyPath = Union[str, os.PathLike]
REMOTE_SCHEMES = ("gs", "s3", "az")
# Objects that make a remote directory "done"; uploaded after every other file (see docstring).
PUBLISH_LAST = ("config.json", "manifest.json", "tokenizer.json", "tokenizer.model")


def is_remote(path: AnyPath) -> bool:
    """Whether `path` is a URL (`gs://bucket/...`) rather than a local path."""
    return "://" in os.fspath(path) if not isinstance(path, Path) else False


def as_path(path: AnyPath):
    """`pathlib.Path` for a local path; `etils.epath.Path` for gs:// (and s3://, az://)."""
    if isinstance(path, Path):
        return path
    text = os.fspath(path)
    if "://" not in text:
        return Path(text)
    scheme = text.split("://", 1)[0]
    if scheme == "file":
        return Path(text[len("file://"):])
    if scheme not in REMOTE_SCHEMES:
        raise InputError(f"{text}: {scheme}:// paths are not supported; use a local path or "
                         f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    _require_client(scheme)
    _configure_clients()
    from etils import epath

    return epath.Path(text)


_CLIENTS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}  # fsspec's client package per scheme


def _require_client(scheme: str) -> None:
    import importlib.util

    package = _CLIENTS[scheme]
    if importlib.util.find_spec(package) is None:
        how = "pip install 'phi_jax[gcs]'" if scheme == "gs" else f"pip install {package}"
        raise DependencyError(f"{scheme}:// paths need the `{package}` package, which is not "
                              f"installed; install it with: {how}")


@functools.cache
def _configure_clients() -> None:
    """No cached directory listings: other processes (the other hosts of a run, a resumed run, a
    curation worker) change a bucket under this one, and a stale listing would hide their steps,
    shards and markers. Set before the first client is made (they are cached per settings)."""
    import fsspec.config

    for scheme in REMOTE_SCHEMES:
        fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)


def bucket_of(path: AnyPath) -> str:
    return os.fspath(path).split("://", 1)[1].split("/", 1)[0]


def _fs(path: AnyPath):
    import fsspec

    _configure_clients()
    return fsspec.filesystem(os.fspath(path).split("://", 1)[0])


def check_bucket(path: AnyPath, flag: str = "") -> None:
    """For a URL: a one-line error naming the path and the fix when its bucket is not there (or
    these credentials cannot see it). Local paths pass. Call it before writing an output."""
    if not is_remote(path):
        return
    as_path(path)  # refuses unsupported schemes
    bucket = bucket_of(path)
    where = f"{flag}={os.fspath(path)}" if flag else os.fspath(path)
    try:
        found = _bucket_visible(_fs(path), os.fspath(path).split("://", 1)[0], bucket)
    except Exception as e:  # noqa: BLE001 - auth, network: report, not a traceback
        raise MissingFileError(f"{where}: cannot reach bucket {bucket!r} ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:160]}); check the bucket name and your "
                               "credentials (gcloud auth application-default login)") from None
    if not found:
        raise MissingFileError(f"{where}: bucket {bucket!r} does not exist or these credentials "
                               f"cannot see it; create it (gcloud storage buckets create gs://{bucket}) "
                               "or fix the path and your credentials (gcloud auth application-default login)")


def _bucket_visible(fs, scheme: str, bucket: str) -> bool:
    if fs.exists(bucket):
        return True
    if scheme != "gs":
        return False
    # Reading a bucket's metadata needs storage.buckets.get, which object-only roles (a VM's
    # service account, often) lack: listing one object is the question that matters here.
    from fsspec.asyn import sync

    try:
        sync(fs.loop, fs._call, "GET", "b/{}/o", bucket, maxResults=1, json_out=True)  # noqa: SLF001
        return True
    except Exception:  # noqa: BLE001 - 404, 403: not a bucket these credentials can use
        return False


def missing(path: AnyPath, what: str = "path", fix: str = "check the path") -> MissingFileError:
    """The one-line error for a path that is not there (names a missing bucket as such)."""
    if is_remote(path):
        check_bucket(path)  # raises the bucket's own error first
    return MissingFileError(f"{what} {os.fspath(path)!r} does not exist; {fix}")


# ---------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: AnyPath, data: bytes):
    path = as_path(path)
    if not isinstance(path, Path):  # one object upload: visible only once complete
        path.write_bytes(data)
        return path
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


def atomic_write_text(path: AnyPath, text: str):
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: AnyPath, obj: Any):
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def upload_file(local: AnyPath, dst: AnyPath) -> None:
    """Copy a finished local file to `dst` (a bucket object appears whole, or not at all)."""
    dst = as_path(dst)
    if isinstance(dst, Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)
    else:
        _fs(dst).put_file(os.fspath(local), os.fspath(dst))


@contextlib.contextmanager
def staged_file(dst: AnyPath, *, overwrite: bool = False, flag: str = "--overwrite") -> Iterator[Path]:
    """Yield a local temporary file path for a writer that needs a real file (GGUF, say); on
    success it becomes `dst`, on an exception it is removed and `dst` is untouched.

    Why: a killed or failed write must never leave a half file under the output's name. Locally
    the temporary file is a hidden sibling (same filesystem) renamed into place; for a bucket it is
    written in the local scratch space and uploaded as one object. An existing `dst` is refused
    unless `overwrite`, naming `flag`.
    """
    check_bucket(dst)
    target = as_path(dst)
    if target.exists() and not overwrite:
        raise InputError(f"{os.fspath(dst)} already exists; choose a new output path, or pass {flag} "
                         "to replace it (the old file is replaced only once the new one is complete)")
    if target.exists() and target.is_dir():
        raise InputError(f"{os.fspath(dst)} is a directory; the output is a file: choose a file path")
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f"phi_jax-{target.name}-")
    os.close(fd)
    try:
        yield Path(tmp)
        if isinstance(target, Path):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            upload_file(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ------------------------------------------------------------------------------ directories
def is_nonempty_dir(path: AnyPath) -> bool:
    p = as_path(path)
    return p.is_dir() and any(p.iterdir())


def check_writable_output(path: AnyPath, *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse an existing non-empty output (or a file where a directory goes) unless `overwrite`."""
    check_bucket(path)
    p = as_path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{p} exists and is a file, not a directory; choose another output path")
    if is_nonempty_dir(p) and not overwrite:
        raise InputError(f"{p} already exists and is not empty; choose a new output directory, or "
                         f"pass {flag} to replace it (the old one is removed only once the new one "
                         "is complete)")


@contextlib.contextmanager
def staged_directory(dst: AnyPath, *, overwrite: bool = False,
                     flag: str = "--overwrite") -> Iterator[Path]:
    """Yield a local temporary directory to fill; on success it becomes `dst` (see the docstring).

    On an exception the temporary directory is removed and `dst` is untouched.
    """
    check_writable_output(dst, overwrite=overwrite, flag=flag)
    dst = as_path(dst)
    if isinstance(dst, Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f"phi_jax-{dst.name}-"))
    try:
        yield tmp
        publish_directory(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(src: Path, dst: AnyPath) -> None:
    """Move the complete local directory `src` to `dst`. Locally: one rename, an existing `dst`
    set aside first and deleted only after the new one is in place. Remote: see the docstring."""
    dst = as_path(dst)
    if not isinstance(dst, Path):
        _publish_remote(src, dst)
        return
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if dst.exists():
            dst.rmdir()
        os.replace(src, dst)


def _publish_remote(src: Path, dst) -> None:
    if dst.exists():
        for old in sorted(_walk_files(dst), key=lambda p: p.name not in PUBLISH_LAST):
            old.unlink()  # publishing objects first: from here on the old output is not "done"
    upload_tree(src, dst)


def upload_tree(src: Path, dst: AnyPath, last: tuple[str, ...] = PUBLISH_LAST) -> None:
    """Upload every file under the local `src` to `dst`, the files named in `last` after the rest
    (deepest first otherwise), so an object that says "done" never precedes what it vouches for."""
    dst = as_path(dst)
    files = sorted((p for p in Path(src).rglob("*") if p.is_file()),
                   key=lambda p: (p.name in last, -len(p.parts), str(p)))
    for file in files:
        upload_file(file, dst / file.relative_to(src).as_posix())


def _walk_files(root) -> list:
    out = []
    for p in root.iterdir():
        out.extend(_walk_files(p) if p.is_dir() else [p])
    return out


def size(path: AnyPath) -> int:
    """Bytes in a file, local or remote."""
    return _fs(path).size(os.fspath(path)) if is_remote(path) else os.path.getsize(path)


def move(src: AnyPath, dst: AnyPath) -> None:
    """Rename a file or directory (on a bucket: copy then delete, object by object)."""
    if not is_remote(src):
        os.replace(src, dst)
    else:
        _fs(src).mv(os.fspath(src).rstrip("/"), os.fspath(dst).rstrip("/"), recursive=True)


def rmtree(path: AnyPath) -> None:
    """Remove a directory tree (missing is fine)."""
    p = as_path(path)
    if isinstance(p, Path):
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.rmtree()


def glob(pattern: str) -> list[str]:
    """Sorted files matching a glob, local or remote; `**` matches any number of directories."""
    if not is_remote(pattern):
        import glob as glob_lib

        return sorted(glob_lib.glob(os.path.expanduser(pattern), recursive=True))
    as_path(pattern)
    fs = _fs(pattern)
    scheme = pattern.split("://", 1)[0]
    body = pattern.split("://", 1)[1]
    # The static prefix (up to the first wildcard's directory) is listed once, recursively.
    static = body.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0]
    # Without `**` only as many levels as the pattern has are listed, not the whole bucket.
    depth = None if "**" in body else body[len(static):].strip("/").count("/") + 1
    try:
        listed = fs.find(static, maxdepth=depth) if "/" in body else []
    except FileNotFoundError:
        listed = []
    regex = _glob_regex(body)
    return sorted(f"{scheme}://{name}" for name in listed if regex.fullmatch(name))


def _glob_regex(pattern: str):
    import re

    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


# ---------------------------------------------------------------------------- local copies
def cache_root() -> Path:
    return Path(os.environ.get("PHI_JAX_CACHE", Path.home() / ".cache" / "phi_jax")) / "remote"


def scratch_dir(url: AnyPath) -> Path:
    """A local working directory that belongs to a remote output (the same one on every run here)."""
    key = hashlib.sha256(os.fspath(url).rstrip("/").encode()).hexdigest()[:24]
    path = cache_root().parent / "scratch" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_copy(path: AnyPath, only: tuple[str, ...] = ()) -> Path:
    """A local path with the content of `path`: itself when local, else a cached download.

    `only`: for a directory, fetch just the files directly in it whose names match these globs
    (the tokenizer beside a model's weights, without the weights).

    The cache (`$PHI_JAX_CACHE/remote`, default ~/.cache/phi_jax) is keyed by URL and reused when
    every object still has the size and generation it had; a download goes to a temporary
    directory renamed into place, so a killed download is never reused.
    """
    p = as_path(path)
    if isinstance(p, Path):
        return p
    if not p.exists():
        raise missing(path, "path", "check the URL (gsutil ls / gcloud storage ls lists a bucket)")
    fs, url = _fs(path), os.fspath(path).rstrip("/")
    is_dir = p.is_dir()
    listing = fs.find(url, detail=True) if is_dir else {url: fs.info(url)}
    if is_dir and only:
        prefix = fs._strip_protocol(url)  # noqa: SLF001 - fsspec's own name normalisation
        listing = {name: info for name, info in listing.items()
                   if "/" not in fs._strip_protocol(name)[len(prefix):].lstrip("/")  # noqa: SLF001
                   and any(fnmatch.fnmatch(name.rsplit("/", 1)[-1], g) for g in only)}
    key = json.dumps([only] + sorted((name, info.get("size"), info.get("generation") or info.get("etag"))
                            for name, info in listing.items()), default=str)
    target = cache_root() / hashlib.sha256(f"{url}\n{key}".encode()).hexdigest()[:24] / p.name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        if is_dir:
            prefix = fs._strip_protocol(url)  # noqa: SLF001 - fsspec's own name normalisation
            (tmp / p.name).mkdir()
            for name in listing:
                rel = fs._strip_protocol(name)[len(prefix):].lstrip("/")  # noqa: SLF001
                (tmp / p.name / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(name, str(tmp / p.name / rel))
        else:
            fs.get_file(url, str(tmp / p.name))
        with contextlib.suppress(OSError):
            os.replace(tmp / p.name, target)  # a racing process may have won: theirs is as good
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
