"""Read one TOML data file safely, and find the line a field is on.

Shared by generation files, tuning tables and overrides files: all are data only, capped in
size, decoded as UTF-8 and parsed with the standard TOML parser; nothing in them is executed
or included. Files that passed validation are read back from their snapshots
(``snapshot``); this module parses the others. The TOML parser is imported on first use.
"""

from __future__ import annotations

import codecs
import re
import sys
from pathlib import Path

from .errors import Problem
from .files import FileRefused, read_capped

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any


def __getattr__(name: str) -> Any:
    if name == "tomllib":
        return _tomllib()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised by the Python 3.10 run of the suite
        import tomli as tomllib
    return tomllib


MAX_FILE_BYTES = 1024 * 1024
MAX_NESTING = 16


def read_toml(path: Path) -> tuple[dict[str, Any] | None, str, list[Problem]]:
    """Return (document, text, problems). The document is None when it cannot be parsed."""
    shown = str(path)
    text = ""

    def fail(line: int | None, message: str, hint: str) -> tuple[None, str, list[Problem]]:
        return None, text, [Problem(shown, line, "", message, hint)]

    try:
        raw = read_capped(path, MAX_FILE_BYTES)
    except FileRefused as e:
        return fail(None, e.message, e.hint)
    if raw.startswith(codecs.BOM_UTF8):
        hint = "save it as UTF-8 without a BOM"
        return fail(1, "file starts with a UTF-8 byte-order mark (BOM)", hint)
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return fail(line, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", "save the file as UTF-8")
    text = decoded
    if not text.strip():
        return fail(None, "file is empty", "fill it in, or delete it")
    tomllib = _tomllib()
    too_deep = f"over the limit of {MAX_NESTING}"
    depth, deep_line = _max_bracket_depth(text)
    if depth > MAX_NESTING:
        return fail(deep_line, f"nesting is {depth} levels deep, {too_deep}", "flatten the file")
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
        return fail(line, f"TOML syntax error: {msg}", hint)
    except RecursionError:
        return fail(None, "nesting too deep to parse", "flatten the file")
    # Dotted keys and table headers nest without brackets (a.a.a... = 1): check the result too.
    depth = _max_doc_depth(doc)
    if depth > MAX_NESTING:
        return fail(None, f"nesting is {depth} levels deep, {too_deep}", "flatten the file")
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


# Compiled by re on first use (and cached there): locate() runs only to place a problem, and
# compiling both at import cost every detect() 0.2 ms.
_HEADER = r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$"
_KEY = r"^\s*([A-Za-z0-9_\-\"'.]+)\s*="


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
        h = re.match(_HEADER, line)
        if h:
            name = tuple(x.strip().strip('"') for x in h.group(2).split("."))
            if h.group(1) == "[[":
                counts[name] = counts.get(name, -1) + 1
            table = _table_path(name, counts, h.group(1) == "[[")
            if _is_prefix(table, loc) and len(table) > header_depth:
                header_line, header_depth = n, len(table)
            elif (
                h.group(1) == "[["
                and header_line is None
                and _is_prefix(name, loc)
                and len(name) == len(loc)
            ):
                header_line = n  # the array as a whole (``sources``): its first entry
            continue
        k = re.match(_KEY, line)
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
