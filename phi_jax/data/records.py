"""One record schema for every curation stage, the shards that hold records, and the manifest.

A record is `{"id": str, "text": str, "meta": {...}}`: every stage reads and writes exactly this,
and adds what it learned under its own key of `meta` (`meta.annotation`, `meta.quality`, ...),
keeping the rest, so stages chain in any order and a record carries what earlier stages found. Shards are JSONL (one record per line, UTF-8) or
ArrayRecord (one JSON-encoded record per entry).

Inputs are planned as `InputShard`s, fixed slices of the inputs, so a run can resume per shard:
  * `default`: the embedded corpus (`phi_jax.data.corpus`), id `stdlib:<path>` / `pydoc_data...`;
  * JSONL / ArrayRecord files (`.jsonl`, `.arrayrecord`, `.array_record`): records as above; a
    foreign line with only a text field is accepted (`text_field`), its id becomes `<file>:<line>`,
    and its other fields are kept under `meta` (so `{"id", "type", "prompt", "answer"}` tasks read
    with `text_field="prompt"` keep their type and answer; `meta`'s own keys win a clash);
  * a directory holding `manifest.json`: the output shards of an earlier stage;
  * any other file or glob: plain UTF-8 text, one record per file, id = the path.
Each input file is cut into slices of `shard_size` records (text files: `shard_size` files per
shard), so one shard never spans two JSONL files and a shard's content never depends on others.

Inputs and outputs may be in a bucket (gs://...; `phi_jax.fileio`): a shard is written to a local
temporary file and published as one object upload, which the store shows whole or not at all.

Every output directory has one `manifest.json` (see `new_manifest`): inputs with their hashes,
the parameters that determine the output, counts in/out (and dropped, by reason), the shards
written, versions and wall time, so every output says where it came from.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from phi_jax import fileio
from phi_jax.errors import InputError, MissingFileError
from phi_jax.fileio import atomic_write_json

MANIFEST = "manifest.json"
SCHEMA = "phi_jax.records/1"
FORMATS = ("jsonl", "arrayrecord")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord"}
_EXTENSION = {"jsonl": ".jsonl", "arrayrecord": ".arrayrecord"}


def make_record(id: str, text: str, meta: dict | None = None) -> dict[str, Any]:  # noqa: A002
    return {"id": id, "text": text, "meta": dict(meta or {})}


def record_from_json(obj: Any, where: str, *, default_id: str, text_field: str = "text") -> dict:
    """A parsed JSON value -> a record, or a one-line error naming `where` and the fix."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(obj).__name__}; "
                         'write {"id": ..., "text": ..., "meta": {...}}')
    text = obj.get(text_field)
    if not isinstance(text, str):
        found = sorted(obj)[:6]
        raise InputError(f"{where}: no string field {text_field!r} (fields: {found}); give every "
                         f"record a text, or pass --text-field=NAME if the text is under another key")
    rid = obj.get("id", default_id)
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        raise InputError(f"{where}: 'id' must be a non-empty string, got {rid!r}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise InputError(f"{where}: 'meta' must be a JSON object, got {type(meta).__name__}")
    extra = {k: v for k, v in obj.items() if k not in ("id", text_field, "meta")}
    return make_record(rid, text, {**extra, **meta} if extra else meta)


def encode_record(record: dict) -> bytes:
    """The canonical bytes of a record (one JSONL line without the newline; an ArrayRecord entry)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_record(data: bytes | str, where: str, *, default_id: str, text_field: str = "text") -> dict:
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: invalid UTF-8 at byte {e.start}; the shard is corrupt: "
                             "regenerate it or remove the record") from None
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); the shard is "
                         "corrupt or truncated: regenerate it or remove the line") from None
    return record_from_json(obj, where, default_id=default_id, text_field=text_field)


# ---------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass(frozen=True)
class InputShard:
    """Records [start, stop) of one input (or `paths[start:stop]` of plain-text files).

    Attributes:
      index: position in the plan; the output shard is `part-<index>`.
      kind: "default" | "jsonl" | "arrayrecord" | "text".
      paths: the input file (jsonl/arrayrecord), this shard's files (text), () (default).
      start, stop: the records of the input file, the corpus, or the input's text files.
    """

    index: int
    kind: str
    paths: tuple[str, ...]
    start: int
    stop: int
    text_field: str = "text"

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def size(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        where = "default corpus" if self.kind == "default" else (
            self.paths[0] if self.kind != "text" else f"{self.paths[0]} ...")
        return f"{self.name} ({where} [{self.start}:{self.stop}])"

    def read(self) -> Iterator[dict]:
        """The shard's records, in order; corrupt data raises an InputError naming file and line."""
        if self.kind == "default":
            from phi_jax.data import corpus

            names, root = corpus.document_names(), corpus.stdlib_dir()
            for name in names[self.start:self.stop]:
                kind = "prose" if name.startswith("pydoc_data.topics:") else "code"
                text = corpus.read_document(name, root)
                yield make_record(f"stdlib:{name}", text, {"source": "stdlib", "kind": kind})
        elif self.kind == "text":
            for path in self.paths:
                data = _read_bytes(path)
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{path}: invalid UTF-8 at byte {e.start}; plain-text inputs "
                                     "must be UTF-8 (convert it, or leave it out of --input)") from None
                yield make_record(path, text, {"source": path})
        else:
            source = _open_source(self.kind, self.paths[0])
            for i in range(self.start, self.stop):
                raw = source[i]
                where = raw["origin"]
                default_id = where if self.kind == "jsonl" else f"{self.paths[0]}:{i}"
                data = raw["data"]
                if self.kind == "arrayrecord" and not data.lstrip()[:1] == b"{":
                    yield _text_record(data, where, default_id)
                    continue
                yield decode_record(data, f"{where} ({self.name})", default_id=default_id,
                                    text_field=self.text_field)


def _text_record(data: bytes, where: str, rid: str) -> dict:
    try:
        return make_record(rid, data.decode("utf-8"), {"source": where})
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: invalid UTF-8 at byte {e.start}; the shard is corrupt") from None


def _read_bytes(path: str) -> bytes:
    try:
        with fileio.as_path(path).open("rb") as f:
            return f.read()
    except OSError as e:
        raise MissingFileError(f"{path}: cannot read ({e.strerror or e}); check the --input path") from None


def _open_source(kind: str, path: str):
    from phi_jax.data import sources

    try:
        if kind == "jsonl":
            return sources.JsonlFileSource(path)
        return sources.ArrayRecordFileSource(path)
    except OSError as e:
        raise MissingFileError(f"{path}: cannot read ({e.strerror or e}); check the --input path") from None
    except Exception as e:  # noqa: BLE001 - array_record raises plain RuntimeErrors for bad files
        raise InputError(f"{path}: not a readable ArrayRecord file ({' '.join(str(e).split())[:200]}); "
                         "the shard is corrupt or truncated: regenerate it") from None


def _format_of(path: str) -> str:
    return _SUFFIX_FORMAT.get(Path(path).suffix.lower(), "text")


def _expand(spec: str) -> list[tuple[str, str]]:
    """One --input item -> [(kind, path)], the kind from the suffix ("default" has no path)."""
    from phi_jax.data import sources

    if spec == "default":
        return [("default", "")]
    if fileio.as_path(spec).is_dir():
        manifest = read_manifest(spec)
        if manifest is None:
            raise InputError(f"--input={spec} is a directory without {MANIFEST}; give files or a glob "
                             f"such as '{spec.rstrip('/')}/**/*.jsonl', or the output of a phi-jax data stage")
        if manifest.get("status") != "complete":
            raise InputError(f"--input={spec}: that stage's run has not finished (status "
                             f"{manifest.get('status')!r}); rerun its command to complete it first")
        return [(_format_of(o["path"]), str(fileio.as_path(spec) / o["path"])) for o in manifest["outputs"]]
    try:
        files = sources.expand_paths([spec])
    except FileNotFoundError as e:
        raise MissingFileError(f"--input: {e}; pass files, globs, an output directory of a phi-jax "
                               "data stage, or 'default' for the embedded corpus") from None
    return [(_format_of(f), f) for f in files]


def plan_shards(inputs: str | Sequence[str], shard_size: int = 1000, *, text_field: str = "text",
                max_records: int = 0) -> list[InputShard]:
    """Cut the inputs (a comma-separated string or a list) into shards of at most `shard_size`;
    `max_records` > 0 keeps only the first that many records (in input order)."""
    if shard_size < 1:
        raise InputError(f"--shard-size={shard_size}: must be >= 1")
    if max_records < 0:
        raise InputError(f"--max-records={max_records}: must be >= 0 (0 = all)")
    specs = [s.strip() for s in inputs.split(",")] if isinstance(inputs, str) else list(inputs)
    specs = [s for s in specs if s]
    if not specs:
        raise InputError("--input is empty; pass files, globs, a stage's output directory or 'default'")
    items: list[tuple[str, str]] = []
    for spec in specs:
        items += _expand(spec)
    shards: list[InputShard] = []
    texts = [p for kind, p in items if kind == "text"]
    for kind, path in items:
        if kind == "text":
            continue
        if kind == "default":
            from phi_jax.data import corpus

            count, paths = len(corpus.document_names()), ()
        else:
            count, paths = len(_open_source(kind, path)), (path,)
        for start in range(0, count, shard_size):
            shards.append(InputShard(len(shards), kind, paths, start, min(count, start + shard_size),
                                     text_field))
    for start in range(0, len(texts), shard_size):
        stop = min(len(texts), start + shard_size)
        shards.append(InputShard(len(shards), "text", tuple(texts[start:stop]), start, stop,
                                 text_field))
    return _first_records(shards, max_records) if max_records else shards


def _first_records(shards: list[InputShard], count: int) -> list[InputShard]:
    kept = []
    for shard in shards:
        if count <= 0:
            break
        take = min(shard.size, count)
        paths = shard.paths[:take] if shard.kind == "text" else shard.paths
        kept.append(dataclasses.replace(shard, paths=paths, stop=shard.start + take))
        count -= take
    return kept


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with fileio.as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_fingerprints(shards: Sequence[InputShard]) -> list[dict[str, Any]]:
    """[{"path", "sha256", "bytes"}] of every input file (the corpus: its content hash)."""
    seen: dict[str, dict[str, Any]] = {}
    for shard in shards:
        if shard.kind == "default" and "default" not in seen:
            from phi_jax.data import corpus

            seen["default"] = {"path": "default", "sha256": corpus.corpus_hash(),
                               "python": platform.python_version()}
        for path in shard.paths:
            if path not in seen:
                seen[path] = {"path": path, "sha256": file_sha256(path), "bytes": fileio.size(path)}
    return list(seen.values())


def upstream_manifests(inputs: str | Sequence[str]) -> list[dict[str, Any]]:
    """[{"path", "manifest_sha256"}] of the inputs that are earlier stages' outputs: the chain of
    manifests a stage was made from (its `inputs` hash the shards themselves)."""
    specs = [s.strip() for s in inputs.split(",")] if isinstance(inputs, str) else list(inputs)
    return [{"path": spec, "manifest_sha256": file_sha256(Path(spec) / MANIFEST)}
            for spec in specs if spec and os.path.isdir(spec) and (Path(spec) / MANIFEST).is_file()]


# --------------------------------------------------------------------------------------- outputs

def output_format(name: str) -> str:
    if name not in FORMATS:
        raise InputError(f"--output-format={name!r}; choose one of {', '.join(FORMATS)}")
    return name


def shard_filename(name: str, fmt: str) -> str:
    return name + _EXTENSION[fmt]


class ShardWriter:
    """Writes one output shard to a temporary sibling; `commit()` fsyncs and renames it into place.

    Until the rename nothing is visible under the final name, so a killed run leaves either a
    complete shard or none (the temporary file is removed on the next run). In a bucket the
    temporary file is local and `commit()` uploads it as one object. The sha256 of the bytes
    written is kept for the manifest.
    """

    def __init__(self, path: str | os.PathLike, fmt: str):
        self.path, self.fmt = fileio.as_path(path), output_format(fmt)
        self._remote = not isinstance(self.path, Path)
        if not self._remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-",
                                         dir=None if self._remote else self.path.parent)
        os.chmod(self._tmp, 0o644)  # mkstemp's 0600 would hide shared data from other users
        self._digest, self.records = hashlib.sha256(), 0
        if fmt == "jsonl":
            self._file = os.fdopen(fd, "wb")
        else:
            os.close(fd)
            from array_record.python.array_record_module import ArrayRecordWriter

            self._file = ArrayRecordWriter(self._tmp, "group_size:1")

    def write(self, record: dict) -> None:
        data = encode_record(record)
        self._digest.update(data + b"\n")
        self._file.write(data + b"\n" if self.fmt == "jsonl" else data)
        self.records += 1

    def commit(self) -> dict[str, Any]:
        """Publish the shard; returns {"path", "records", "sha256", "bytes"} for the manifest."""
        if self.fmt == "jsonl":
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        if self.fmt != "jsonl":
            with open(self._tmp, "rb") as f:
                os.fsync(f.fileno())
        size = os.path.getsize(self._tmp)
        if self._remote:
            fileio.upload_file(self._tmp, self.path)
            os.unlink(self._tmp)
        else:
            os.replace(self._tmp, self.path)
        return {"path": self.path.name, "records": self.records, "sha256": self._digest.hexdigest(),
                "bytes": size}

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


def read_records(path: str | os.PathLike, *, text_field: str = "text") -> Iterator[dict]:
    """Every record of one JSONL / ArrayRecord shard (for tests and small tools)."""
    path = str(path)
    kind = _format_of(path)
    if kind == "text":
        raise InputError(f"{path}: not a record shard (.jsonl, .arrayrecord)")
    source = _open_source(kind, path)
    shard = InputShard(0, kind, (path,), 0, len(source), text_field)
    return shard.read()


def iter_output(directory: str | os.PathLike) -> Iterator[dict]:
    """The records of a finished stage's output directory, shard by shard."""
    for kind, path in _expand(str(directory)):
        yield from read_records(path)


# -------------------------------------------------------------------------------------- manifest

def versions() -> dict[str, str]:
    """Versions of the libraries this process has imported (what could have shaped the output)."""
    out = {"python": platform.python_version()}
    for name in ("phi_jax", "numpy", "jax", "flax", "apache_beam", "sklearn", "httpx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            out[name] = module.__version__
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_manifest(stage: str, parameters: dict, inputs: list[dict], *, settings: dict | None = None
                 ) -> dict[str, Any]:
    """The manifest of an output that is being written (status "running").

    `parameters` are what the output depends on (a rerun with other parameters is refused);
    `settings` are how it ran (runner, workers, concurrency) and may differ between resumes.
    """
    return {"schema": SCHEMA, "stage": stage, "status": "running", "parameters": parameters,
            "inputs": inputs, "settings": settings or {}, "outputs": [],
            "counts": {"records_in": 0, "records_out": 0, "dropped": {}, "stage": {}},
            "versions": versions(), "created": now(), "runs": []}


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = fileio.as_path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable manifest ({e}); it was not written by phi-jax, or was "
                         "edited: restore it, or pass --overwrite to start the output again") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise InputError(f"{path}: not a phi_jax records manifest (schema {SCHEMA!r} expected)")
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    return atomic_write_json(fileio.as_path(directory) / MANIFEST, manifest)


def parameter_differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every parameter that differs (missing keys count)."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]


def batched(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
