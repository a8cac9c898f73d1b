"""Read one TOML data file safely and turn validation errors into ``Problem``s with lines.

Shared by generation files, tuning tables and overrides files: all are data only, capped in
size, decoded as UTF-8 and parsed with the standard TOML parser; nothing in them is executed
or included.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

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
    "int_parsing": "write a whole number without quotes",
    "int_type": "write a whole number without quotes",
    "int_from_float": "write a whole number",
    "float_parsing": "write a number without quotes",
    "float_type": "write a number without quotes",
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
    depth = _max_bracket_depth(text)
    if depth > MAX_NESTING:
        return None, text, [Problem(shown, None, "", f"nesting is {depth} levels deep, over the limit of {MAX_NESTING}", "flatten the file")]
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        line = int(m.group(1)) if m else getattr(e, "lineno", None)
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg).strip()
        if m:
            msg = f"{msg} at column {m.group(2)}"
        return None, text, [Problem(shown, line, "", f"TOML syntax error: {msg}", "fix the TOML syntax")]
    except RecursionError:
        return None, text, [Problem(shown, None, "", "nesting too deep to parse", "flatten the file")]
    return doc, text, []


def _max_bracket_depth(text: str) -> int:
    """Cheap upper bound on inline nesting, checked before parsing (a deep document can
    exhaust the parser's recursion). Brackets inside strings may overcount; real data files
    never come near the limit."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


def validate(model: type[BaseModel], doc: dict, text: str, path: Path, prefix: tuple = ()) -> tuple[BaseModel | None, list[Problem]]:
    try:
        return model.model_validate(doc), []
    except ValidationError as e:
        return None, problems_from(e, text, str(path), prefix)


def problems_from(err: ValidationError, text: str, shown: str, prefix: tuple = ()) -> list[Problem]:
    out = []
    for item in err.errors(include_url=False):
        loc = prefix + tuple(item["loc"])
        field = dotted(loc)
        msg = item["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if item["type"] not in ("missing", "extra_forbidden", "model_type") and "input" in item and not isinstance(item["input"], (dict, list)):
            msg = f"{msg} (got {item['input']!r})"
        hint = _HINTS.get(item["type"], "")
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
    counted so that ``sources[2].url`` finds the third block's ``url``."""
    table: tuple = ()
    counts: dict[tuple, int] = {}
    header_line, header_depth = None, 0
    for n, line in enumerate(text.splitlines(), 1):
        h = _HEADER.match(line)
        if h:
            name = tuple(x.strip().strip('"') for x in h.group(2).split("."))
            if h.group(1) == "[[":
                counts[name] = counts.get(name, -1) + 1
                table = name + (counts[name],)
            else:
                table = name
            if _is_prefix(table, loc) and len(table) > header_depth:
                header_line, header_depth = n, len(table)
            continue
        k = _KEY.match(line)
        if k and _is_prefix(table + (k.group(1).strip("\"'"),), loc):
            return n
    return header_line


def _is_prefix(path: tuple, loc: tuple) -> bool:
    return len(path) <= len(loc) and tuple(loc[: len(path)]) == path
