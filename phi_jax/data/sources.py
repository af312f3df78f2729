"""Random-access record sources: text files, JSONL, ArrayRecord and tfds.

Every source yields raw records `{"origin": str, "data": bytes | str | dict}`; nothing is decoded or
parsed here, so that bad bytes surface in `documents.py` with the record's origin ("file:line") and
are handled by the one bad-data policy. Sources are plain picklable objects (Grain sends them to
worker processes) and open their files lazily in whichever process reads. Paths may be URLs
(gs://...): ArrayRecord files are read from the bucket directly; a JSONL file is fetched once into
the local cache (`phi_jax.fileio.local_copy`) and indexed there; its records keep the URL as origin.
"""

from __future__ import annotations

import bisect
import functools
import glob
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from phi_jax import fileio
from phi_jax.errors import ConfigError, MissingFileError


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Comma-separated string or list of paths/globs -> sorted, de-duplicated file list.

    Each pattern must match at least one file: a typo in a path is an error, not an empty dataset.
    """
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    if not paths:
        raise ConfigError("data.paths is empty; set --config.data.paths='a.jsonl,dir/*.jsonl' "
                         "(comma-separated files or globs)")
    files: list[str] = []
    for pattern in paths:
        if fileio.is_remote(pattern):
            fileio.check_bucket(pattern)
            if fileio.has_magic(pattern):
                matches = fileio.glob(pattern)  # objects only
            else:
                matches = [pattern] if fileio.as_path(pattern).is_file() else []
            is_dir = not matches and fileio.as_path(pattern).is_dir()
        else:
            pattern = os.path.expanduser(pattern)
            matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
            matches = [m for m in matches if os.path.isfile(m)]
            is_dir = os.path.isdir(pattern)
        if not matches:
            hint = " (it is a directory: use a glob such as dir/**/*.txt)" if is_dir else ""
            raise MissingFileError(f"data path {pattern!r} matches no file{hint}")
        files.extend(matches)
    return list(dict.fromkeys(files))


_SCAN_BLOCK = 1 << 24  # bytes read at a time while indexing lines


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte spans [start, end) and 1-based line numbers of the non-blank lines of a file.

    The file is read in blocks of _SCAN_BLOCK bytes, so indexing a file larger than memory holds
    only its line offsets (24 bytes per line), never a copy or a mask of the whole file. The index
    of the last few files is kept (read-only) per process and file version: the shards of one file
    (curation reads a file as many slices) share one scan.
    """
    stat = os.stat(path)
    return _indexed_lines(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _indexed_lines(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    ends_parts, carriage_parts = [], []  # newline offsets, and whether "\r" stands before each
    block, offset, last = bytearray(min(size, _SCAN_BLOCK)), 0, 0
    with open(path, "rb") as f:
        while n := f.readinto(block):
            data = np.frombuffer(block, np.uint8, count=n)
            local = np.flatnonzero(data == ord("\n"))
            before = np.where(local > 0, data[np.maximum(local - 1, 0)], last)
            ends_parts.append(local + offset)
            carriage_parts.append(before == ord("\r"))
            last, offset = int(data[n - 1]), offset + n
    ends, carriage = np.concatenate(ends_parts), np.concatenate(carriage_parts)
    if not len(ends) or ends[-1] != size - 1:
        ends = np.append(ends, size)  # Last line without a trailing newline.
        carriage = np.append(carriage, last == ord("\r"))
    starts = np.concatenate([[0], ends[:-1] + 1])
    keep = ends - (carriage & (ends > starts)) > starts
    out = starts[keep].astype(np.int64), ends[keep].astype(np.int64), np.flatnonzero(keep) + 1
    for array in out:
        array.flags.writeable = False
    return out


class ConcatSource:
    """Concatenation of several sources with global indices, keeping each record's origin."""

    def __init__(self, sources: Sequence[Any]):
        self._sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self._sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        which = bisect.bisect_right(self._ends, index)
        start = self._ends[which - 1] if which else 0
        return self._sources[which][index - start]


class TextFileSource:
    """One document per file (raw bytes; UTF-8 is checked when the document is parsed)."""

    def __init__(self, path: str):
        self._path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        with fileio.as_path(self._path).open("rb") as f:
            return {"origin": self._path, "data": f.read()}


class JsonlFileSource:
    """One record per non-blank line of a JSONL file; line offsets are indexed once, up front.

    Indexing is a vectorized newline scan over a memory map (about 1 GB/s), so even large shards
    open quickly and any line can be read directly by a worker. Empty lines are not records.
    """

    def __init__(self, path: str):
        self._path = path
        self._local = str(fileio.local_copy(path))  # the file itself when local
        self._starts, self._ends, self._line_numbers = _line_spans(self._local)
        self._fd = None
        self._fd_pid = None

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = state["_fd_pid"] = None  # Descriptors don't survive pickling into workers.
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self._local, os.O_RDONLY), os.getpid()
        start, end = int(self._starts[index]), int(self._ends[index])
        data = os.pread(self._fd, end - start, start)
        return {"origin": f"{self._path}:{int(self._line_numbers[index])}", "data": data}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)


class ArrayRecordFileSource:
    """Records of one ArrayRecord file (bytes: UTF-8 text or a JSON object)."""

    def __init__(self, path: str):
        import grain  # pylint: disable=g-import-not-at-top
        self._path = path
        self._source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"origin": f"{self._path}[record {int(index)}]", "data": self._source[int(index)]}


class TfdsSource:
    """A prepared TFDS split read through `tfds.data_source` (ArrayRecord format, random access).

    Nothing is downloaded: the dataset must already be prepared in `data_dir`
    (`builder.download_and_prepare(file_format="array_record")`).
    """

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        self._label = f"tfds:{name}/{split}"
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                             download=False)
        except Exception as e:  # tfds raises several types for "not prepared".
            raise MissingFileError(
                f"cannot open {self._label} in data_dir={data_dir!r}: {e}. Prepare it first with "
                "`tfds.builder(name, data_dir=...).download_and_prepare(file_format='array_record')` on a "
                "machine that can reach its source, then point data.tfds_data_dir at it") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"origin": f"{self._label}[{int(index)}]", "data": self._source[int(index)]}
