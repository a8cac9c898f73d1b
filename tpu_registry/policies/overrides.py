"""The overrides policy: a user's TOML file that sets any knob, per generation and workload.

::

    schema_version = 1

    [[override]]
    generation = "v6e"                  # id, alias or identifier; "*" for every generation
    match = { max_model_len = 4096 }    # optional: workload fields that must be equal
    note = "measured on our v6e-8 pool"
    [override.knobs]
    page_size = 64
    "rpa_v3.d_block_sizes" = [1, 1024, 1, 1024]

The file comes from ``TPU_REGISTRY_OVERRIDES`` or ``--overrides``. Overrides are the user's
own data: a broken one is an error, never skipped. The first matching entry that sets a knob
wins.
"""

from __future__ import annotations

import logging
import os
import stat
from contextvars import ContextVar
from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from tpu_registry.errors import Problem, TuningError
from tpu_registry.hookspecs import hookimpl
from tpu_registry.spec import SCHEMA_VERSION, _Model
from tpu_registry.tomlfile import locate, read_toml, validate
from tpu_registry.tune import Layer, Workload, coerce_knob

ENV_OVERRIDES = "TPU_REGISTRY_OVERRIDES"
log = logging.getLogger("tpu_registry")

# Set by resolve(overrides=...) for the duration of one tuning call; else the env variable.
overrides_path: ContextVar[str | None] = ContextVar("tpu_registry_overrides", default=None)

WORKLOAD_FIELDS = tuple(f.name for f in fields(Workload))


class Override(_Model):
    generation: str = Field(min_length=1)
    match: dict[str, int | str] = Field(default_factory=dict)
    knobs: dict[str, Any] = Field(min_length=1)
    note: str = ""

    @field_validator("match")
    @classmethod
    def _known_fields(cls, v: dict) -> dict:
        unknown = sorted(set(v) - set(WORKLOAD_FIELDS))
        if unknown:
            raise ValueError(f"match names unknown workload fields: {', '.join(unknown)} (known: {', '.join(WORKLOAD_FIELDS)})")
        return v

    @field_validator("knobs", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        flat: dict[str, Any] = {}
        for k, val in v.items():
            if isinstance(val, dict):  # [override.knobs.rpa_v3] d_block_sizes = ...
                for k2, v2 in val.items():
                    flat[f"{k}.{k2}"] = v2
            else:
                flat[k] = val
        out = {}
        for k, val in flat.items():
            out[k] = coerce_knob(k, val)
        return out


class OverridesFile(_Model):
    schema_version: int
    override: list[Override] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, v: int) -> int:
        if not 1 <= v <= SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is not one this tpu-registry understands ({SCHEMA_VERSION})")
        return v


def current_path() -> str | None:
    return overrides_path.get() or os.environ.get(ENV_OVERRIDES) or None


def writable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    except OSError:
        return False


_cache: dict[tuple, tuple[OverridesFile, str]] = {}


def load_overrides(path: Path) -> tuple[OverridesFile, str]:
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        key = (str(path), None, None)
    if key in _cache:
        return _cache[key]
    doc, text, problems = read_toml(path)
    if doc is None:
        raise TuningError(problems)
    model, problems = validate(OverridesFile, doc, text, path)
    if model is None:
        raise TuningError(problems)
    _cache[key] = (model, text)  # type: ignore[assignment]
    return model, text  # type: ignore[return-value]


def matches(o: Override, w: Workload) -> bool:
    for k, want in o.match.items():
        have = getattr(w, k)
        if isinstance(want, str) and k.endswith("dtype"):
            from tpu_registry.tune import canonical_dtype

            want = canonical_dtype(want)
        if have != want:
            return False
    return True


@hookimpl(tryfirst=True)
def tpu_registry_tune(spec, workload: Workload, detection) -> Layer | None:
    raw = current_path()
    if not raw:
        return None
    path = Path(raw)
    model, text = load_overrides(path)
    from tpu_registry.catalog import load_catalog

    catalog = None
    knobs: dict[str, Any] = {}
    for i, o in enumerate(model.override):
        if o.generation != "*":
            catalog = catalog or load_catalog()
            hits = catalog.find(o.generation)
            if not hits:
                raise TuningError([Problem(str(path), locate(text, ("override", i, "generation")), f"override[{i}].generation", f"{o.generation!r} names no generation", "use an id from `tpu-registry list`, or \"*\"")])
            if spec.id not in hits:
                continue
        if not matches(o, workload):
            continue
        for k, v in o.knobs.items():
            knobs.setdefault(k, v)
    if not knobs:
        return None
    note = f"from {path}"
    if writable_by_others(path):
        note += " (warning: the file is writable by other users)"
        log.warning("overrides file %s is writable by other users; anyone who can write it chooses your kernel knobs", path)
    return Layer("overrides", knobs, note)
