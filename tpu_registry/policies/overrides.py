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

The file comes from ``--overrides`` (``resolve(overrides=...)``) or ``TPU_REGISTRY_OVERRIDES``,
handed to the policy in its context. Overrides are the user's
own data: a broken one is an error, never skipped. The first matching entry that sets a knob
wins.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from tpu_registry import records, snapshot
from tpu_registry.errors import Problem, TuningError
from tpu_registry.hookspecs import hookimpl
from tpu_registry.tomlfile import locate, read_toml
from tpu_registry.types import Layer, TuneContext
from tpu_registry.units import canonical_dtype

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from tpu_registry.workload import Workload

KERNEL_FAMILIES = frozenset(records.KERNEL_FAMILIES)
_SCHEMA_NAMES = ("Override", "OverridesFile", "WORKLOAD_FIELDS")


def __getattr__(name: str) -> Any:
    """The pydantic models live in ``schemas``: imported only when asked for."""
    if name in _SCHEMA_NAMES:
        from tpu_registry.policies import schemas

        return getattr(schemas, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def writable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    except OSError:
        return False


def warn_writable(path: Path) -> None:
    from tpu_registry.errors import warn

    warn(
        "overrides file %s is writable by other users; anyone who can write it chooses your "
        "kernel knobs (chmod go-w %s)",
        path,
        path,
    )


_cache: dict[tuple, tuple[records.OverridesFile, str]] = {}


def _validated(path: Path) -> tuple[dict[str, Any] | None, str, list[Problem]]:
    """Parse and validate an overrides file with its pydantic model."""
    from tpu_registry.modelerrors import validate
    from tpu_registry.policies.schemas import OverridesFile

    doc, text, problems = read_toml(path)
    if doc is None:
        return None, text, problems
    model, problems = validate(OverridesFile, doc, text, path)
    if model is None:
        return None, text, problems
    return model.model_dump(), text, []


def load_overrides(path: Path) -> tuple[records.OverridesFile, str]:
    """The validated file (from its snapshot when unchanged) and its text."""
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, st.st_mode)
    except OSError:  # it fails to load below, so this key is looked up but never stored
        key = (str(path), None, None, None)  # pragma: no mutate (any key finds nothing)
    if key in _cache:
        return _cache[key]
    [item] = snapshot.load("overrides", path, [path], _validated, records.OverridesFile.from_dict)
    if item.data is None:
        raise TuningError(item.problems)
    text = item.text
    if text is None:  # served from the snapshot: the text places problems found later
        raw = snapshot.read_regular(path)
        text = "" if raw is None else raw.decode("utf-8", errors="replace")
    if writable_by_others(path):  # once per version of the file, not once per policy run
        warn_writable(path)
    _cache[key] = (item.data, text)
    return item.data, text


def unknown_generations(model, text: str, path: Path, catalog) -> list[Problem]:
    """Entries whose ``generation`` names nothing in the catalog (``"*"`` names everything)."""
    return [
        Problem(
            str(path),
            locate(text, ("override", i, "generation")),
            f"override[{i}].generation",
            f"{o.generation!r} names no generation",
            'use an id from `tpu-registry list`, or "*"',
        )
        for i, o in enumerate(model.override)
        if o.generation != "*" and not catalog.find(o.generation)
    ]


def generation_problems(
    model, text: str, path: Path, catalog, only: str | None = None
) -> list[Problem]:
    """Entries that break a rule of the generation they name (a VMEM limit above its core),
    found the same way by ``validate`` and by the policy, before any workload is known."""
    out = []
    for i, o in enumerate(model.override):
        gids = catalog.find(o.generation)  # none for "*": the kernel rule checks it per workload
        if only is not None:
            gids = gids & {only}
        for gid in sorted(gids):
            spec = catalog[gid]
            vmem = spec.chip.vmem_bytes_per_core
            for k, v in o.knobs.items():
                if k.endswith("vmem_limit_bytes") and v > vmem:
                    line = locate(text, ("override", i, "knobs", *k.split(".")))
                    mib = spec.chip.vmem_mib_per_core
                    msg = (
                        f"{k} {v} is above the {gid} core VMEM of {vmem} bytes ({mib:g} MiB) "
                        "[rule vmem_within_core]"
                    )
                    out.append(
                        Problem(
                            str(path), line, f"override[{i}].knobs.{k}", msg, f"use at most {vmem}"
                        )
                    )
    return out


def matches(o, w: Workload) -> bool:
    for k, want in o.match.items():
        have = getattr(w, k)
        if k.endswith("dtype"):  # the schema admits only names canonical_dtype knows
            want = canonical_dtype(want)
        if have != want:
            return False
    return True


@hookimpl(tryfirst=True)
def tpu_registry_tune(spec, workload: Workload, context: TuneContext) -> Layer | None:
    if context.overrides_path is None:
        return None
    return overrides_layer(spec, workload, context, context.overrides_path)


# The hook's body is a plain function: mutation testing (``make mutate``) leaves decorated
# functions alone, and this holds the policy's rules.
def overrides_layer(spec, workload: Workload, context: TuneContext, path: Path) -> Layer | None:
    """The first matching entry that sets a knob wins; entries for other generations and
    workloads are passed over; knobs of a kernel family that does not run are left out."""
    try:
        model, text = load_overrides(path)
    except TuningError:
        raise
    except Exception as e:  # noqa: BLE001 - never skip the user's file: say why it failed
        msg = f"cannot read the overrides file: {type(e).__name__}: {e}".rstrip(": ")
        hint = "fix the file or unset TPU_REGISTRY_OVERRIDES / --overrides"
        raise TuningError([Problem(str(path), None, "", msg, hint)]) from None
    problems = unknown_generations(model, text, path, context.catalog)
    # An entry for another generation is that generation's business (`validate` reports it).
    problems += generation_problems(model, text, path, context.catalog, only=spec.id)
    if problems:
        raise TuningError(problems)
    knobs: dict[str, Any] = {}
    said = []  # the notes of the entries that set a knob
    for o in model.override:
        if o.generation != "*":
            if spec.id not in context.catalog.find(o.generation):
                continue
        if not matches(o, workload):
            continue
        for k, v in o.knobs.items():
            if k not in knobs:
                knobs[k] = v
                if o.note and o.note not in said:
                    said.append(o.note)
    from tpu_registry import kernels  # on first use: detection registers this plugin too

    # Knobs of a kernel family that does not run this workload (RPA v3 blocks for a head-dim-64
    # model, say) would be reported as set while no kernel reads them: left out, and said so.
    running = set(kernels.families_for(spec, workload))
    idle_prefixes = tuple(f"{f}." for f in KERNEL_FAMILIES - running)
    idle = sorted(k for k in knobs if k.startswith(idle_prefixes))
    for k in idle:
        del knobs[k]
    if not knobs and not idle:
        return None
    note = f"from {path}" + "".join(f"; {n}" for n in said)
    if idle:
        note += (
            "; not applied (the kernels that run this workload: "
            f"{', '.join(sorted(running)) or 'none'}): " + ", ".join(idle)
        )
    if writable_by_others(path):
        note += " (warning: the file is writable by other users)"
    return Layer("overrides", knobs, note=note)


def clear_cache() -> None:
    _cache.clear()
