"""Validated snapshots: data files are validated by pydantic once, then read back as JSON.

Like ``__pycache__``: a folder of data files (generation files, tuning tables) or one overrides
file has one snapshot under ``$TPU_REGISTRY_CACHE_DIR/snapshots`` holding, for every file that
passed validation, its validated data (``model_dump()``), the SHA-256 of its bytes and its
``os.stat`` signature. A file whose signature is unchanged is served from the snapshot without
being read; one whose signature changed is read and hashed, and served from the snapshot only
if its bytes are the same; otherwise it is parsed and validated again (the caller's ``build``)
and the snapshot is rewritten. A file touched within ``RACY_NS`` of being recorded is always
hashed (a second edit in the same timestamp tick keeps its size and time).

The snapshot's file name is keyed on the folder, the kind of data, the package version, the
schema (``records.SCHEMA_HASH``), the Python version and the size and time of the modules that
validate, so another version or another checkout never reads it. Its payload carries a CRC-32:
a corrupt snapshot is rebuilt with a warning, never served. Writers write a private temporary
file and rename it over the snapshot (atomic on POSIX), so concurrent processes leave one
valid snapshot. A folder that cannot be written is bypassed with one warning; one that other
users can write to is not used at all; ``TPU_REGISTRY_CACHE_DIR=off`` turns snapshots off.
Files with problems are never stored: they are validated again each time, so their errors are
always reported from the file itself.

Layout: one header line (CRC-32 of the rest, the length of the JSON table, the length of the
tail), the JSON table (the key, then per file its signature, hash and either its data or, with
``load(index=)``, a small index and the offset of its data in the tail), then the tail: the
data of indexed files as raw JSON, parsed only for the files a caller asks for.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from . import records
from .errors import warn
from .files import FileRefused, read_capped
from .version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

ENV_CACHE = "TPU_REGISTRY_CACHE_DIR"
FORMAT = 1
RACY_NS = 2_000_000_000
MAX_FILE_BYTES = 1024 * 1024  # as tomlfile.MAX_FILE_BYTES: a bigger file goes to the slow path
# A snapshot holds validated data of files of at most 1 MiB each; a cache file that is not a
# regular file or is larger than this is not used.
MAX_SNAPSHOT_BYTES = 1 << 30
# Modules whose code decides what a valid file is, or what its data looks like once validated.
SCHEMA_MODULES = (
    "spec.py",
    "derived.py",
    "records.py",
    "tomlfile.py",
    "knobs.py",
    "units.py",
    "workload.py",
    "snapshot.py",
    "policies/schemas.py",
)
_HERE = Path(__file__).resolve().parent


def cache_dir() -> Path | None:
    """The snapshot folder, or None when ``TPU_REGISTRY_CACHE_DIR=off``."""
    base = os.environ.get(ENV_CACHE)
    if base == "off":
        return None
    if not base:
        base = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tpu-registry"
        )
    return Path(base) / "snapshots"


_code_stamp: str | None = None


def code_stamp() -> str:
    """Version, schema hash, Python version and the size and time of every validating module."""
    global _code_stamp
    if _code_stamp is None:
        parts = [
            str(FORMAT),
            __version__,
            records.SCHEMA_HASH,
            "{}.{}".format(*sys.version_info[:2]),
        ]
        for name in SCHEMA_MODULES:
            try:
                st = os.stat(_HERE / name)
                parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                parts.append(f"{name}:-")
        _code_stamp = "|".join(parts)
    return _code_stamp


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def read_regular(path: Path, limit: int = MAX_FILE_BYTES) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes (``files.read_capped``), else
    None: the caller's slow path then reports what is wrong."""
    try:
        return read_capped(path, limit)
    except FileRefused:
        return None


_untrusted_warned: set[str] = set()
_unwritable_warned: set[str] = set()


def _trusted(folder: Path) -> bool:
    """A snapshot stands in for the files it was made from, so it is used only when no one
    else can write to its folder: ours, not group/world-writable (created 0700)."""
    try:
        st = folder.stat()
    except OSError:
        return True  # not created yet: _write creates it 0700
    ours = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    if ours and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return True
    if str(folder) not in _untrusted_warned:
        _untrusted_warned.add(str(folder))
        warn(
            "snapshot cache %s is writable by other users or not yours; not using it (chmod 700 "
            "it, or set %s)",
            folder,
            ENV_CACHE,
        )
    return False


def snapshot_path(kind: str, source: Path) -> Path | None:
    """Where the snapshot of ``source`` (a folder, or one overrides file) lives; None: off."""
    folder = cache_dir()
    if folder is None:
        return None
    key = "\0".join((kind, os.path.abspath(source), code_stamp()))
    raw = key.encode()
    # Two checksums make a name collision practically impossible; the key inside the file is
    # compared too, so one would cost a rebuild, never a wrong answer.
    return folder / f"{kind}-{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}.json"


def read_blob(path: Path) -> Any:
    """The JSON value of a checksummed cache file; None when there is none (a corrupt or
    unreadable one is reported, and treated as absent)."""
    parts = read_parts(path)
    return None if parts is None else parts[0]


def read_parts(path: Path) -> tuple[Any, memoryview] | None:
    """A checksummed cache file: ``<crc32> <json length> <tail length>`` on the first line,
    then a JSON value, then a tail of raw bytes the value may point into (offsets), so a
    reader parses only the small JSON part. None when there is none (a corrupt or unreadable
    one is reported, and treated as absent).

    The tail is a view into the bytes read, not a copy: a catalog of 5,000 files has a 47 MB
    snapshot, and copying its body and tail took 40 ms of a 280 ms load."""
    try:
        blob = read_capped(path, MAX_SNAPSHOT_BYTES)
    except FileRefused as e:
        if os.path.lexists(path):
            warn("cannot use cache file %s (%s); not using it", path, e.message)
        return None
    try:
        start = blob.find(b"\n") + 1
        if not start:
            raise ValueError("no header line")
        crc_hex, length, tail = blob[: start - 1].split(b" ")
        length, tail = int(length), int(tail)
        body = memoryview(blob)[start:]
        if length + tail != len(body) or int(crc_hex, 16) != zlib.crc32(body):
            raise ValueError("checksum mismatch")
        return json.loads(blob[start : start + length]), body[length:]
    except ValueError as e:
        warn("snapshot %s is corrupt (%s); rebuilding it", path, e)
        return None


def write_blob(path: Path, value: Any, tail: bytes | memoryview = b"") -> None:
    """Write a checksummed cache file (``read_parts``) atomically: a private temporary file
    renamed over it; a folder that cannot be written is reported once and bypassed."""
    payload = json.dumps(value, separators=(",", ":")).encode()
    body = payload + tail
    blob = b"%08x %d %d\n" % (zlib.crc32(body), len(payload), len(tail)) + body
    tmp = path.parent / f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if str(path.parent) not in _unwritable_warned:
            _unwritable_warned.add(str(path.parent))
            warn(
                "cannot write snapshots to %s (%s); every process validates the data files "
                "again (set %s to a writable folder, or to off)",
                path.parent,
                e.strerror or e,
                ENV_CACHE,
            )


def cache_file(name: str) -> Path | None:
    """A file in the trusted snapshot folder; None when snapshots are off or untrusted."""
    folder = cache_dir()
    if folder is None or not _trusted(folder):
        return None
    return folder / name


def _read(path: Path, kind: str, source: Path) -> tuple[dict[str, Any], bytes | memoryview]:
    """The file table of a snapshot and the raw data it points into; ({}, b"") when there is
    none or it is corrupt."""
    parts = read_parts(path)
    if parts is None:
        return {}, b""
    doc, tail = parts
    try:
        if doc["key"] != [kind, os.path.abspath(source), code_stamp()]:
            raise ValueError("it was made for other files")
        files = doc["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict)
            and "sha256" in e
            and ("data" in e or ("index" in e and _span(e.get("at"), len(tail))))
            for e in files.values()
        ):
            raise ValueError("malformed file table")
        return files, tail
    except (ValueError, KeyError, TypeError) as e:
        warn("snapshot %s is corrupt (%s); rebuilding it from the data files", path, e)
        return {}, b""


def _span(at: Any, size: int) -> bool:
    return (
        isinstance(at, list)
        and len(at) == 2
        and all(type(x) is int and x >= 0 for x in at)
        and at[0] + at[1] <= size
    )


def _write(path: Path, kind: str, source: Path, files: dict[str, Any], tail: bytes) -> None:
    """Entries with ``text`` (the data as JSON bytes) are written into the tail."""
    chunks: list[bytes] = []
    offset = 0
    table = {}
    for name, entry in files.items():
        entry = dict(entry)
        text = entry.pop("text", None)
        if text is None and "at" in entry:
            start, n = entry["at"]
            text = tail[start : start + n]
        if text is not None:
            entry["at"] = [offset, len(text)]
            chunks.append(text)
            offset += len(text)
        table[name] = entry
    key = [kind, os.path.abspath(source), code_stamp()]
    write_blob(path, {"key": key, "files": table}, b"".join(chunks))


def _convert(convert: Callable[..., Any], where: Path | None, *stored: Any) -> Any:
    """A stored entry as a record; None (with a warning) when it does not fit the records."""
    try:
        return convert(*stored)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        warn("snapshot %s is corrupt (%s: %s); rebuilding it", where, type(e).__name__, e)
        return None


class Text:
    """A file's validated data as JSON bytes, sliced from a snapshot when first asked for."""

    __slots__ = ("blob", "start", "end")

    def __init__(self, blob: bytes | memoryview, start: int, end: int | None) -> None:
        self.blob, self.start, self.end = blob, start, end

    def load(self) -> Any:
        return json.loads(bytes(self.blob[self.start : self.end]))  # the tail is a memoryview


class Item:
    """One data file as loaded: its validated data, or the problems found in it."""

    __slots__ = ("path", "data", "text", "problems")

    def __init__(self, path: Path, data: Any, text: str | None, problems: list) -> None:
        self.path, self.data, self.text, self.problems = path, data, text, problems


Build = Callable[[Path], "tuple[dict[str, Any] | None, str, list]"]


def load(
    kind: str,
    source: Path,
    paths: Iterable[Path],
    build: Build,
    convert: Callable[..., Any],
    index: Callable[[Any], Any] | None = None,
) -> list[Item]:
    """Each of ``paths`` (files of ``source``) from the snapshot when unchanged, else from
    ``build(path)`` -> (validated data as plain JSON values, or None; text; problems).
    ``Item.data`` is ``convert(data)``: the record the caller works with.

    With ``index``, a file's data is stored as JSON text beside ``index(data)`` (a few fields
    the caller needs at once) and ``Item.data`` is ``convert(index, text)``: the caller parses
    the text only when it needs the rest, so a catalog of thousands of files loads without
    building thousands of records nobody asks for."""

    def stored(data: Any) -> dict[str, Any]:
        if index is None:
            return {"data": data}
        text = json.dumps(data, separators=(",", ":")).encode()
        return {"index": index(data), "text": text}

    def record(entry: dict[str, Any]) -> Any:
        if index is None:
            return _convert(convert, where, entry["data"])
        if "text" in entry:
            return _convert(convert, where, entry["index"], Text(entry["text"], 0, None))
        start, n = entry["at"]
        return _convert(convert, where, entry["index"], Text(tail, start, start + n))

    where = snapshot_path(kind, source)
    if where is not None and not _trusted(where.parent):
        where = None
    old, tail = _read(where, kind, source) if where is not None else ({}, b"")
    new: dict[str, Any] = {}
    out: list[Item] = []
    dirty = False
    now_ns = time.time_ns()
    for path in paths:
        name = str(path)
        entry = old.get(name)
        try:
            st = os.stat(path)
            sig = _signature(st) if stat.S_ISREG(st.st_mode) else None
        except OSError:
            sig = None
        racy = sig is not None and now_ns - sig[1] < RACY_NS
        if entry is not None and sig is not None and entry.get("st") == sig and not racy:
            rec = record(entry)
            if rec is not None:
                new[name] = entry
                out.append(Item(path, rec, None, []))
                continue
            entry = None
        raw = read_regular(path) if sig is not None else None
        digest = None
        if raw is not None:
            import hashlib

            digest = hashlib.sha256(raw).hexdigest()
            if entry is not None and entry.get("sha256") == digest:
                rec = record(entry)
                if rec is not None:
                    fresh = {**entry, "st": None if racy else sig}
                    dirty = dirty or fresh["st"] != entry.get("st")
                    new[name] = fresh
                    out.append(Item(path, rec, None, []))
                    continue
        data, text, problems = build(path)
        rec = None
        if data is not None:
            # Exactly what a snapshot reader gets back, so both paths give the same records.
            entry = stored(json.loads(json.dumps(data)))  # what a snapshot reader gets back
            rec = record(entry)
            if digest is not None and not problems:
                # Stored under the hash of the bytes read before building: if the file changed
                # in between, the next process sees a different hash and validates it again.
                new[name] = {"st": None if racy else sig, "sha256": digest, **entry}
                dirty = True
        out.append(Item(path, rec, text, problems))
    if where is not None and (dirty or set(new) != set(old)):
        _write(where, kind, source, new, tail)
    return out
