"""The parse cache: TOML documents kept as JSON, keyed by the SHA-256 of the file's bytes.

Like __pycache__: pure-Python TOML parsing of the 1,336-row tuning tables takes tens of
milliseconds, loading the same document from JSON well under one. Only the parsing is
skipped; every document is still validated. A cache that cannot be written (read-only home)
is simply not used; ``TPU_REGISTRY_CACHE_DIR=off`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from .files import FileRefused, read_capped

ENV_CACHE = "TPU_REGISTRY_CACHE_DIR"
# A cached document of a data file (at most 1 MiB of TOML) is smaller than this; a cache file
# that is not a regular file or is larger is not used.
MAX_CACHED_BYTES = 8 * 1024 * 1024


def cache_dir() -> Path:
    base = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tpu-registry"
    )
    return Path(base) / "toml-json"


def _cache_file(raw: bytes) -> Path:
    return cache_dir() / (hashlib.sha256(raw).hexdigest() + ".json")


_untrusted_warned: set[str] = set()


def _cache_trusted(folder: Path) -> bool:
    """A cached document stands in for the file it was parsed from, so the cache is used only
    when no one else can write to it: the folder must be ours and not group/world-writable
    (it is created 0700). Otherwise it is ignored, with one warning per folder."""
    try:
        st = folder.stat()
    except OSError:
        return True  # not created yet: put() creates it 0700
    ours = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    if ours and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return True
    if str(folder) not in _untrusted_warned:
        _untrusted_warned.add(str(folder))
        logging.getLogger("tpu_registry").warning(
            "parse cache %s is writable by other users or not yours; not using it (chmod 700 it, "
            "or set %s)",
            folder,
            ENV_CACHE,
        )
    return False


def get(raw: bytes) -> dict[str, Any] | None:
    if os.environ.get(ENV_CACHE) == "off" or not _cache_trusted(cache_dir()):
        return None
    try:
        doc = json.loads(read_capped(_cache_file(raw), MAX_CACHED_BYTES))
    except (FileRefused, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def put(raw: bytes, doc: dict[str, Any]) -> None:
    if os.environ.get(ENV_CACHE) == "off" or not _cache_trusted(cache_dir()):
        return
    try:
        data = json.dumps(doc, separators=(",", ":"))
    except (TypeError, ValueError):
        return  # TOML dates and times have no JSON form: such a file is just not cached
    target = _cache_file(raw)
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        pass
