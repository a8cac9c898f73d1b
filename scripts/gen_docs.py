"""Regenerate the parts of the docs that come from the code: README's settings table and the
knob and rule tables of docs/overrides.md.

    python scripts/gen_docs.py          # rewrite them in place
    python scripts/gen_docs.py --check  # exit 1 when one is out of date

The table lists the core's settings and those the plugins in ``plugins/`` declare through
``tpu_registry_settings``; the plugin modules are loaded from the checkout, so the table does
not depend on which plugins are installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
OVERRIDES_DOC = REPO / "docs" / "overrides.md"
START, END = "<!-- settings:start (scripts/gen_docs.py) -->", "<!-- settings:end -->"
# Plugin modules in this repository that implement tpu_registry_settings.
PLUGIN_SETTINGS = {
    "gce": REPO / "plugins/tpu-registry-gce/tpu_registry_gce/__init__.py",
    "vllm": REPO / "plugins/tpu-registry-vllm/tpu_registry_vllm/registry_plugin.py",
}


def repo_settings() -> list:
    from dataclasses import replace

    from tpu_registry import settings

    out = list(settings.BUILTIN)
    for owner, path in PLUGIN_SETTINGS.items():
        package = path.parent
        sys.path.insert(0, str(package.parent))  # the plugin package's own relative imports
        try:
            name = package.name if path.name == "__init__.py" else f"{package.name}.{path.stem}"
            spec = importlib.util.spec_from_file_location(
                name, path, submodule_search_locations=None
            )
            if path.name != "__init__.py":
                importlib.import_module(package.name)  # the parent package first
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
        out += [replace(s, owner=owner) for s in module.tpu_registry_settings()]
    return out


def table() -> str:
    from tpu_registry import settings

    return settings.markdown_table(repo_settings())


def knob_table() -> str:
    from tpu_registry.knobs import REGISTRY

    rows = ["| knob | type | range | what it is |", "|---|---|---|---|"]
    for s in REGISTRY.values():
        kind = "4 whole numbers" if s.kind == "blocks" else "whole number"
        if s.power_of_two:
            kind += ", a power of two"
        span = f"1..{s.maximum}" + (f" {s.unit}" if s.unit else "")
        what = s.doc if s.settable else f"{s.doc} (derived: cannot be set)"
        rows.append(f"| `{s.name}` | {kind} | {span} | {what} |")
    return "\n".join(rows)


def rule_table() -> str:
    from tpu_registry.kernels import RULES

    rows = ["| rule | mirrors |", "|---|---|"]
    rows += [f"| `{name}` | {text} |" for name, text in RULES.items()]
    return "\n".join(rows)


def _fill(text: str, marker: str, body: str) -> str:
    start, end = f"<!-- {marker}:start (scripts/gen_docs.py) -->", f"<!-- {marker}:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render_overrides_doc(text: str) -> str:
    return _fill(_fill(text, "knobs", knob_table()), "rules", rule_table())


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    stale = []
    for path, fn in ((README, render), (OVERRIDES_DOC, render_overrides_doc)):
        text = path.read_text()
        new = fn(text)
        if new == text:
            continue
        stale.append(path.name)
        if "--check" not in argv:
            path.write_text(new)
    if stale and "--check" in argv:
        print(f"out of date: {', '.join(stale)}: run python scripts/gen_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
