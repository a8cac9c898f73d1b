"""`tpu-registry validate` and `schema`: check every data file and report every problem.

A path may be a folder of generation files (its ``tuning/`` subfolder is checked as tables),
a generation file, a tuning table or an overrides file; the kind of a file is told by its
top-level keys. Generation files are checked together with the catalog, so duplicate ids and
identifier collisions across files are found too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import Problem, RegistryError


def file_kind(doc: dict[str, Any]) -> str:
    # A table missing one of its keys is still a table (not a generation file with a dozen
    # unknown keys); generation files always have [chip].
    if ("rows" in doc or "kernel" in doc) and "chip" not in doc:
        return "table"
    if "override" in doc or set(doc) <= {"schema_version"}:  # an overrides file may be empty
        return "overrides"
    return "generation"


def validate_paths(paths: list[Path]) -> tuple[int, list[Problem]]:
    import os

    from . import catalog as cat
    from .modelerrors import validate
    from .plugins import get_plugins
    from .policies.overrides import (
        generation_problems,
        unknown_generations,
        warn_writable,
        writable_by_others,
    )
    from .policies.schemas import OverridesFile, Table
    from .policies.tables import table_folders
    from .spec import Generation
    from .tomlfile import read_toml

    problems: list[Problem] = []
    generation_files: list[tuple[Path, str]] = []
    other_files: list[tuple[Path, str]] = []
    if not paths:
        try:
            plugin_dirs = get_plugins().hardware_dirs()
        except RegistryError as e:
            problems += e.problems
            plugin_dirs = []
        for folder, origin in cat.search_folders(plugin_dirs=plugin_dirs):
            files, probs = cat.list_files(folder, origin)
            problems += probs
            generation_files += [(f, origin) for f in files]
        for folder in table_folders(os.environ):
            if folder.is_dir():
                other_files += [(f, "tables") for f in sorted(folder.glob("*.toml"))]
            elif folder != cat.builtin_hardware_dir() / "tuning":
                problems.append(
                    Problem(
                        str(folder),
                        None,
                        "",
                        "tuning-table folder does not exist",
                        "create it or fix TPU_REGISTRY_TABLES_PATH",
                    )
                )
    else:
        builtin = cat.builtin_hardware_dir().resolve()
        for path in paths:
            if path.is_dir():
                files, probs = cat.list_files(path, "argument")
                problems += probs
                generation_files += [(f, "argument") for f in files]
                if (path / "tuning").is_dir():
                    other_files += [(f, "tables") for f in sorted((path / "tuning").glob("*.toml"))]
            elif path.exists() or path.is_symlink():
                other_files.append((path, "argument"))
            else:
                problems.append(
                    Problem(str(path), None, "", "no such file or folder", "check the path")
                )
        # Check the named generation files against the built-in catalog for collisions.
        named = {
            p.resolve() for p, _ in generation_files + other_files
        }  # a built-in file named itself is not a duplicate
        if builtin not in {p.resolve() for p in paths}:
            generation_files = [
                (f, "built-in")
                for f in cat.list_files(builtin, "built-in")[0]
                if f.resolve() not in named
            ] + generation_files

    loaded = []
    overrides: list[tuple[Any, str, Path]] = []
    n = 0
    for path, _origin in generation_files:
        n += 1
        spec, text, probs = cat.load_generation_file(path)
        problems += probs
        if spec is not None:
            loaded.append((spec, path, text))
    for path, origin in other_files:
        n += 1
        doc, text, probs = read_toml(path)
        problems += probs
        if doc is None:
            continue
        kind = "table" if origin == "tables" else file_kind(doc)
        if kind == "generation":
            spec, probs = validate(Generation, doc, text, path)
            problems += probs
            if spec is not None:
                loaded.append((spec, path, text))
            continue
        model = Table if kind == "table" else OverridesFile
        checked, probs = validate(model, doc, text, path)
        problems += probs
        if kind == "overrides" and checked is not None:
            overrides.append((checked, text, path))
            if writable_by_others(path):
                warn_writable(path)
    catalog = cat._assemble(loaded, (), problems)
    if overrides:
        # As the overrides policy checks them when used: against the files being checked,
        # else the catalog in use (plugins and TPU_REGISTRY_PATH included).
        known = _Names([catalog])
        try:
            known.catalogs.append(cat.load_catalog())
        except RegistryError:
            pass  # its problems are reported when that catalog is validated
        for checked, text, path in overrides:
            problems += unknown_generations(checked, text, path, known)
            problems += generation_problems(checked, text, path, known)
    return n, problems


class _Names:
    def __init__(self, catalogs: list) -> None:
        self.catalogs = catalogs

    def find(self, text: str) -> set[str]:
        return set().union(*(c.find(text) for c in self.catalogs))

    def __getitem__(self, gid: str):
        return next(c[gid] for c in self.catalogs if gid in c)


def json_schema(kind: str = "generation") -> dict[str, Any]:
    from .policies.schemas import OverridesFile, Table
    from .spec import Generation

    model = {"generation": Generation, "table": Table, "overrides": OverridesFile}[kind]
    schema = model.model_json_schema()
    if kind == "overrides":  # the knobs table is checked by the knob registry
        from .knobs import json_schema as knobs_schema

        schema["$defs"]["Override"]["properties"]["knobs"] = knobs_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", f"tpu-registry {kind} file")
    return schema
