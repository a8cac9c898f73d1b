"""Run the tuning policies and merge their layers into one set of knobs, with provenance.

Layers merge in hook call order (the first called wins); each final knob remembers its layer
and the layers it beat. The merged knobs must pass the kernel rules (``kernels.check``): a
plugin layer that breaks one is dropped and named; the user's own overrides breaking one is
an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from . import kernels
from . import knobs as knob_registry
from .errors import Problem, TuningError
from .types import Fault, Knob, Layer, TuneContext, Tuning, Violation

if TYPE_CHECKING:
    from .plugins import Plugins

ENV_POLICIES = "TPU_REGISTRY_POLICIES"
RESERVED_LAYERS = ("workload", "baseline", "tables", "overrides")
# Layers whose violations are errors, not plugin faults: the user's data and the baseline.
ACCOUNTABLE = ("overrides", "workload", "baseline")


def _active_policies(env: Mapping[str, str]) -> set[str] | None:
    raw = env.get(ENV_POLICIES, "").strip()
    return {p.strip() for p in raw.split(",") if p.strip()} if raw else None


def run_policies(plugins: Plugins, context: TuneContext) -> tuple[list[Layer], list[Fault]]:
    """Every ``tpu_registry_tune`` implementation in hook order, each answer checked."""
    active = _active_policies(context.env)
    pairs, faults = plugins.tune(
        context.spec, context.workload, context.detection, context, only=active
    )
    layers: list[Layer] = []
    for plugin, out in pairs:
        if out.name in RESERVED_LAYERS and plugin not in RESERVED_LAYERS:
            # Layers are told apart by name: a plugin posing as the user's overrides or the
            # baseline would be blamed on them (and dropping it would drop theirs).
            msg = f"named its layer {out.name!r}, which is reserved for a built-in layer; skipped"
            faults.append(Fault(plugin, msg, stage="tune"))
            continue
        try:
            layers.append(
                replace(out, knobs={k: knob_registry.coerce(k, v) for k, v in out.knobs.items()})
            )
        except ValueError as e:
            faults.append(Fault(plugin, str(e), stage="tune"))
    if active is not None:
        known = set(plugins.policy_names())
        if missing := sorted(active - known):
            names = ", ".join(missing)
            raise TuningError(
                f"{ENV_POLICIES} names unknown policies: {names} (known: "
                f"{', '.join(sorted(known))})"
            )
    return layers, faults


def merge(layers: list[Layer]) -> dict[str, Knob]:
    """First layer wins; each knob records the layers it beat."""
    out: dict[str, Knob] = {}
    for layer in layers:
        for name, value in layer.knobs.items():
            if name in out:
                k = out[name]
                out[name] = replace(k, overrode=k.overrode + ((layer.name, value),))
            else:
                out[name] = Knob(value, layer.name)
    return out


def _values(knobs: Mapping[str, Knob]) -> dict:
    return {k: v.value for k, v in knobs.items()}


def tune(plugins: Plugins, context: TuneContext, *, strict: bool = False) -> Tuning:
    """Run the policies and merge their layers, checking kernel constraints.

    A page size fixed by the workload wins over every layer. When the layers settle on a
    page size other than the one the policies assumed, they run once more with it pinned,
    so kernel block sizes are computed for the page size actually used.
    """
    spec, workload = context.spec, context.workload
    layers, faults = run_policies(plugins, context)
    if workload.page_size is not None:
        layers.insert(
            0, Layer("workload", {"page_size": workload.page_size}, note="fixed by the user")
        )
    knobs = merge(layers)
    page = knobs.get("page_size")
    dropped: set[str] = set()
    bad_page = kernels.check(spec, workload, {"page_size": page.value}) if page is not None else []
    if bad_page and page.layer not in ACCOUNTABLE and not strict:
        # Every block size computed for a broken page size would look broken too (and be
        # blamed on its layer): drop the plugin layer that chose it first.
        faults.append(_dropped(page.layer, bad_page))
        dropped.add(page.layer)
        layers = [layer for layer in layers if layer.name not in dropped]
        knobs = merge(layers)
        page = knobs.get("page_size")
        bad_page = (
            kernels.check(spec, workload, {"page_size": page.value}) if page is not None else []
        )
    # A broken page size is never pinned (the workload would reject it): the check below
    # reports it.
    if page is not None and page.layer not in ("workload", "baseline") and not bad_page:
        pinned = replace(context, workload=replace(workload, page_size=page.value))
        again, more = run_policies(plugins, pinned)
        first = knobs
        layers = [layer for layer in again if layer.name not in dropped]
        faults += [f for f in more if f not in faults]
        knobs = merge(layers)
        for name in ("page_size", "min_page_size", "max_num_seqs_smem"):
            if name in first:
                knobs[name] = first[name]
    violations = kernels.check(spec, workload, _values(knobs))
    while violations:
        # A plugin layer whose knobs break a kernel rule is dropped and named; the user's own
        # overrides breaking one (or anything under strict) is an error. Plugin layers go
        # first: a rule between two knobs (a VMEM limit above the ceiling a plugin set) is
        # reported against one knob, which may be innocent.
        involved = {v: {knobs[k].layer for k in v.knobs if k in knobs} for v in violations}
        droppable = set().union(*involved.values()) - set(ACCOUNTABLE)
        if strict or not droppable:
            raise TuningError([_problem(v, knobs) for v in violations])
        for name in sorted(droppable):
            faults.append(_dropped(name, [v for v in violations if name in involved[v]]))
        layers = [layer for layer in layers if layer.name not in droppable]
        knobs = merge(layers)
        violations = kernels.check(spec, workload, _values(knobs))
    if strict and faults:
        hint = "fix or disable the plugin (TPU_REGISTRY_DISABLE_PLUGINS), or drop strict"
        raise TuningError(
            [Problem(f"policy {f.plugin}", None, "", f.message, hint) for f in faults]
        )
    return Tuning(
        dict(sorted(knobs.items())), tuple(layer.name for layer in layers), faults=tuple(faults)
    )


def _dropped(layer: str, violations: list[Violation]) -> Fault:
    return Fault(
        layer,
        "knobs break kernel constraints, layer dropped: " + "; ".join(map(str, violations)),
        stage="tune",
    )


def _problem(v: Violation, knobs: Mapping[str, Knob]) -> Problem:
    layer = knobs[v.knob].layer if v.knob in knobs else "?"
    return Problem(
        f"layer {layer}",
        None,
        v.knob,
        v.message,
        v.hint or "lower the value or remove the override",
    )
