"""Read one TOML data file safely and turn validation errors into ``Problem``s with lines.

Shared by generation files, tuning tables and overrides files: all are data only, capped in
size, decoded as UTF-8 and parsed with the standard TOML parser; nothing in them is executed
or included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from .errors import Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the Python 3.10 run of the suite
    import tomli as tomllib

MAX_FILE_BYTES = 1024 * 1024
MAX_NESTING = 16

_HINTS = {
    "extra_forbidden": "unknown key: check its spelling against `tpu-registry schema`",
    "missing": "add this required field",
    "greater_than": "check the value and its unit",
    "greater_than_equal": "check the value and its unit",
    "less_than": "check the value and its unit (GB/s, not Gbps; GiB, not bytes)",
    "less_than_equal": "check the value and its unit (GB/s, not Gbps; GiB, not bytes)",
}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
# Field names carry their unit; a range error on a field without one is not a unit slip.
_UNIT_MARKERS = ("_gb_s", "_gib", "_mib", "_kib", "_tflops", "_tops")
_HINTS_NO_UNIT = {
    "greater_than": "check the value against the allowed range",
    "greater_than_equal": "check the value against the allowed range",
    "less_than": "check the value against the allowed range",
    "less_than_equal": "check the value against the allowed range",
    "int_parsing": "write a whole number without quotes",
    "int_type": "write a whole number without quotes",
    "int_from_float": "write a whole number",
    "float_parsing": "write a number without quotes",
    "float_type": "write a number without quotes",
    "finite_number": "write a finite number (not nan or inf)",
    "bool_type": "write true or false",
    "bool_parsing": "write true or false",
    "string_type": "write a quoted string",
    "list_type": "write a list: [ ... ]",
    "literal_error": "use one of the allowed values",
    "string_pattern_mismatch": "see `tpu-registry schema` for the allowed form",
    "too_short": "add at least one entry",
    "model_type": "write a table",
    "dict_type": "write a table",
}


# Error type of the registry's own validators: they say what is wrong, how to fix it and, with
# ``at``, which key below the validated value is at fault (so the line can be found).
DATA_ERROR = "registry_data"


def data_error(message: str, hint: str = "", at: tuple = ()) -> PydanticCustomError:
    """An error for a validator to raise: ``message`` is shown as is, ``hint`` as the fix,
    ``at`` is appended to the location pydantic reports (a field validator's field, or a model
    validator's model)."""
    return PydanticCustomError(DATA_ERROR, "{message}", {"message": message, "hint": hint, "at": tuple(at)})


def read_toml(path: Path) -> tuple[dict[str, Any] | None, str, list[Problem]]:
    """Return (document, text, problems). The document is None when it cannot be parsed."""
    shown = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return None, "", [Problem(shown, None, "", f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit", "data files are small; is this the right file?")]
        raw = path.read_bytes()
    except OSError as e:
        return None, "", [Problem(shown, None, "", f"cannot read file: {e.strerror or e}", "check that it exists and is readable")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return None, "", [Problem(shown, line, "", f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", "save the file as UTF-8")]
    if not text.strip():
        return None, text, [Problem(shown, None, "", "file is empty", "fill it in, or delete it")]
    cached = _cache_get(raw)
    if cached is not None:
        return cached, text, []
    depth, deep_line = _max_bracket_depth(text)
    if depth > MAX_NESTING:
        return None, text, [Problem(shown, deep_line, "", f"nesting is {depth} levels deep, over the limit of {MAX_NESTING}", "flatten the file")]
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        line = int(m.group(1)) if m else getattr(e, "lineno", None)
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg).strip()
        hint = "fix the TOML syntax"
        if m:
            msg = f"{msg} at column {m.group(2)}"
        elif "(at end of document)" in msg:
            # The parser ran off the end: say where it stopped, and what usually causes it.
            line = len(text.splitlines()) or 1
            msg = msg.replace("(at end of document)", "at end of file").strip()
            hint = "a bracket, brace or quote opened earlier is never closed"
        return None, text, [Problem(shown, line, "", f"TOML syntax error: {msg}", hint)]
    except RecursionError:
        return None, text, [Problem(shown, None, "", "nesting too deep to parse", "flatten the file")]
    # Dotted keys and table headers nest without brackets (a.a.a... = 1): check the result too.
    depth = _max_doc_depth(doc)
    if depth > MAX_NESTING:
        return None, text, [Problem(shown, None, "", f"nesting is {depth} levels deep, over the limit of {MAX_NESTING}", "flatten the file")]
    _cache_put(raw, doc)
    return doc, text, []


def _max_doc_depth(doc: Any) -> int:
    """Depth of nested tables and arrays, without recursion."""
    deepest = 0
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        children = value.values() if isinstance(value, dict) else value
        stack += [(c, depth + 1) for c in children if isinstance(c, (dict, list))]
    return deepest


# Parsed documents are cached as JSON keyed by the SHA-256 of the file's bytes, like
# __pycache__: pure-Python TOML parsing of the 1,336-row tuning tables takes tens of
# milliseconds, loading the same document from JSON well under one. Only the parsing is
# skipped; every document is still validated by the pydantic models. A cache that cannot be
# written (read-only home) is simply not used.
ENV_CACHE = "TPU_REGISTRY_CACHE_DIR"


def cache_dir() -> Path:
    base = os.environ.get(ENV_CACHE) or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tpu-registry")
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
        return True  # not created yet: _cache_put creates it 0700
    ours = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    if ours and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return True
    if str(folder) not in _untrusted_warned:
        _untrusted_warned.add(str(folder))
        logging.getLogger("tpu_registry").warning("parse cache %s is writable by other users or not yours; not using it (chmod 700 it, or set %s)", folder, ENV_CACHE)
    return False


def _cache_get(raw: bytes) -> dict[str, Any] | None:
    if os.environ.get(ENV_CACHE) == "off" or not _cache_trusted(cache_dir()):
        return None
    try:
        doc = json.loads(_cache_file(raw).read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _cache_put(raw: bytes, doc: dict[str, Any]) -> None:
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


def _max_bracket_depth(text: str) -> tuple[int, int | None]:
    """Cheap upper bound on inline nesting, checked before parsing (a deep document can
    exhaust the parser's recursion), with the line where it first goes over the limit.
    Brackets inside strings may overcount; real data files never come near the limit."""
    depth = deepest = 0
    line, over_line = 1, None
    for ch in text:
        if ch == "\n":
            line += 1
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if depth > MAX_NESTING and over_line is None:
                over_line = line
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest, over_line


def validate(model: type[BaseModel], doc: dict, text: str, path: Path, prefix: tuple = ()) -> tuple[BaseModel | None, list[Problem]]:
    try:
        return model.model_validate(doc), []
    except ValidationError as e:
        return None, problems_from(e, text, str(path), prefix)


def problems_from(err: ValidationError, text: str, shown: str, prefix: tuple = ()) -> list[Problem]:
    out = []
    for item in err.errors(include_url=False):
        loc = prefix + tuple(item["loc"])
        if item["type"] == DATA_ERROR:
            ctx = item.get("ctx") or {}
            loc += tuple(ctx.get("at", ()))
            out.append(Problem(shown, locate(text, loc), dotted(loc), str(ctx.get("message", item["msg"])), str(ctx.get("hint", ""))))
            continue
        field = dotted(loc)
        msg = item["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if item["type"] not in ("missing", "extra_forbidden", "model_type") and "input" in item and not isinstance(item["input"], (dict, list)):
            got = item["input"]
            msg = f"{msg} (got {str(got).lower() if isinstance(got, bool) else repr(got)})"  # as TOML spells it
        hint = _HINTS.get(item["type"], "")
        if item["type"] in _RANGE_ERRORS and not any(m in str(loc[-1] if loc else "") for m in _UNIT_MARKERS):
            hint = _HINTS_NO_UNIT[item["type"]]
        if item["type"] == "int_type" and isinstance(item.get("input"), bool):
            hint = "write a whole number, not true or false"
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(Problem(shown, locate(text, loc), field, msg, hint))
    return out


def dotted(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")


def locate(text: str, loc: tuple) -> int | None:
    """Best-effort line of a validation error: the line of the key it names, else the header
    of the deepest table on its path, else None. Array-of-tables entries ([[sources]]) are
    counted so that ``sources[2].url`` finds the third block's ``url``, and sub-tables of such
    an entry (``[override.knobs]``) are placed under it. An index into a multi-line array whose
    items start their own lines (``rows = [`` then one ``[...]`` per line) finds that item's
    line."""
    table: tuple = ()
    counts: dict[tuple, int] = {}
    header_line, header_depth = None, 0
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        h = _HEADER.match(line)
        if h:
            name = tuple(x.strip().strip('"') for x in h.group(2).split("."))
            if h.group(1) == "[[":
                counts[name] = counts.get(name, -1) + 1
            table = _table_path(name, counts, h.group(1) == "[[")
            if _is_prefix(table, loc) and len(table) > header_depth:
                header_line, header_depth = n, len(table)
            elif h.group(1) == "[[" and header_line is None and _is_prefix(name, loc) and len(name) == len(loc):
                header_line = n  # the array as a whole (``sources``): its first entry
            continue
        k = _KEY.match(line)
        if k:
            path = table + tuple(part.strip().strip("\"'") for part in k.group(1).split("."))
            if _is_prefix(path, loc):
                return _item_line(lines, n, loc[len(path)] if len(loc) > len(path) else None)
    return header_line


def _table_path(name: tuple, counts: dict[tuple, int], is_array: bool) -> tuple:
    """``[override.knobs]`` after the second ``[[override]]`` is ``("override", 1, "knobs")``."""
    out: list = []
    for i, part in enumerate(name):
        out.append(part)
        if name[: i + 1] in counts and (i < len(name) - 1 or is_array):
            out.append(counts[name[: i + 1]])
    return tuple(out)


def _item_line(lines: list[str], n: int, index) -> int:
    """Line of item ``index`` of a multi-line array of arrays or inline tables opened on line n."""
    if not isinstance(index, int) or not lines[n - 1].rstrip().endswith("["):
        return n
    seen = -1
    for m in range(n, len(lines)):
        item = lines[m].strip()
        if item.startswith("]"):
            break
        if item.startswith(("[", "{")):
            seen += 1
            if seen == index:
                return m + 1
    return n


def _is_prefix(path: tuple, loc: tuple) -> bool:
    return len(path) <= len(loc) and tuple(loc[: len(path)]) == path
