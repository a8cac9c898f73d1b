"""Run the tuning policies and merge their layers into one set of knobs, with provenance.

Layers merge in hook call order (the first called wins); each final knob remembers its layer
and the layers it beat. The merged knobs must pass the kernel rules (``kernels.check``): a
plugin layer that breaks one is dropped and named; the user's own overrides breaking one is
an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import kernels
from . import knobs as knob_registry
from .errors import Problem, TuningError
from .frozen import replace
from .types import Fault, Knob, Layer, TuneContext, Tuning, Violation

if TYPE_CHECKING:
    from .plugins import Plugins

ENV_POLICIES = "TPU_REGISTRY_POLICIES"
RESERVED_LAYERS = ("workload", "baseline", "tables", "overrides")
# Layers whose violations are errors, not plugin faults: the user's data and the baseline.
ACCOUNTABLE = ("overrides", "workload", "baseline")
ESSENTIAL = "baseline"  # always runs; cannot be disabled


def _active_policies(env: Mapping[str, str]) -> set[str] | None:
    raw = env.get(ENV_POLICIES, "").strip()
    return {p.strip() for p in raw.split(",") if p.strip()} if raw else None


def run_policies(plugins: Plugins, context: TuneContext) -> tuple[list[Layer], list[Fault]]:
    """Every ``tpu_registry_tune`` implementation in hook order, each answer checked.

    ``TPU_REGISTRY_POLICIES`` selects the policies that run besides the baseline, which is
    essential: without it no page size or block size would be set."""
    active = _active_policies(context.env)
    if active is not None:
        known = set(plugins.policy_names())
        if missing := sorted(active - known):
            names = ", ".join(missing)
            raise TuningError(
                f"{ENV_POLICIES} names unknown policies: {names} (known: "
                f"{', '.join(sorted(known))})"
            )
        active = active | {ESSENTIAL}
    pairs, faults = plugins.tune(
        context.spec, context.workload, context.detection, context, only=active
    )
    layers: list[Layer] = []
    for plugin, out in pairs:
        if out.name in RESERVED_LAYERS and plugin != out.name:
            # Layers are told apart by name: a plugin posing as the user's overrides or the
            # baseline would be blamed on them (and dropping it would drop theirs).
            msg = f"named its layer {out.name!r}, which is reserved for a built-in layer; skipped"
            faults.append(Fault(plugin, msg, stage="tune"))
            continue
        if plugin == ESSENTIAL:
            layers.append(out)  # upstream's own defaults: not explicit kernel arguments
            continue
        try:
            layers.append(
                replace(out, knobs={k: knob_registry.coerce(k, v) for k, v in out.knobs.items()})
            )
        except knob_registry.KnobError as e:
            faults.append(Fault(plugin, f"{e} ({e.hint})", stage="tune"))  # every one has a hint
    if not any(layer.name == ESSENTIAL for layer in layers):
        raise TuningError(
            f"the {ESSENTIAL} policy did not run: it is essential and cannot be disabled"
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


# Knobs upstream computes from the page size: computed for the winning page (tune() reruns the
# policies with it pinned) and marked as derived from it.
PAGE_DEPENDENT = (
    "max_num_seqs_smem",
    "rpa_v2.num_kv_pages_per_block",
    *kernels.RPA_V3_CASES.values(),
    *kernels.HD64_KNOBS,
)


def _derive(w, knobs: dict[str, Knob], rank: Mapping[str, int]) -> None:
    """Recompute what upstream derives from other knobs, from the winning values."""
    page = knobs["page_size"]  # the baseline, which always runs, always sets it
    # Values follow the page already: tune() reruns the policies with a winning page pinned,
    # so the baseline computed them for it. What is left is to say where the page came from.
    if page.layer != ESSENTIAL:
        for name in PAGE_DEPENDENT:
            k = knobs.get(name)
            if k is not None and rank[k.layer] > rank[page.layer]:
                knobs[name] = replace(k, derived_from=(("page_size", page.layer),))
    ceiling = knobs.get("vmem_limit_bytes")
    if ceiling is None:
        return
    for name in kernels.FAMILY_VMEM_KNOBS:
        k = knobs.get(name)
        # A family limit from a less trusted layer follows the common ceiling; one from the
        # same or a more trusted layer above it is that layer's own contradiction.
        if k is not None and k.value > ceiling.value and rank[k.layer] > rank[ceiling.layer]:
            knobs[name] = replace(
                k, value=ceiling.value, derived_from=(("vmem_limit_bytes", ceiling.layer),)
            )
    # The head-dim-64 kernel's blocks (the baseline's) follow a lowered limit too.
    limit = knobs.get("rpa_v3_hd64.vmem_limit_bytes")
    blocks = [knobs.get(n) for n in kernels.HD64_KNOBS]
    if (
        limit is not None
        and limit.derived_from
        and all(b is not None and b.layer == ESSENTIAL for b in blocks)
    ):
        values = (blocks[0].value, blocks[1].value)
        fitted = kernels.rpa_v3_hd64_fit_vmem(w, page.value, values, limit.value)
        if fitted is not None and fitted != values:
            via = (("rpa_v3_hd64.vmem_limit_bytes", limit.derived_from[0][1]),)
            for i, name in enumerate(kernels.HD64_KNOBS):  # (KV pages, queries), like fitted
                b = blocks[i]
                knobs[name] = replace(b, value=fitted[i], derived_from=b.derived_from + via)
    # Upstream's block sizes (the baseline's) follow a lowered RPA v3 limit.
    limit = knobs.get("rpa_v3.vmem_limit_bytes")
    if limit is None or not limit.derived_from:
        return
    for name in kernels.RPA_V3_CASES.values():
        k = knobs.get(name)
        if k is not None and k.layer == ESSENTIAL:
            fitted = kernels.rpa_v3_fit_vmem(w, k.value, page.value, limit.value)
            if fitted is not None and fitted != k.value:
                derived = k.derived_from + (("rpa_v3.vmem_limit_bytes", limit.derived_from[0][1]),)
                knobs[name] = replace(k, value=fitted, derived_from=derived)


def tune(plugins: Plugins, context: TuneContext, *, strict: bool) -> Tuning:
    """Run the policies, merge their layers and derive what follows from the winners.

    A page size fixed by the workload wins over every layer. When the layers settle on a
    page size other than the one the policies assumed, they run once more with it pinned, so
    everything upstream computes from the page is computed for the page actually used. The
    result must pass every kernel rule: a plugin layer that breaks one is dropped and named;
    the user's own overrides (or anything under ``strict``) breaking one is an error.
    """
    spec, workload = context.spec, context.workload
    layers, faults = run_policies(plugins, context)
    if workload.page_size is not None:
        layers.insert(
            0, Layer("workload", {"page_size": workload.page_size}, note="fixed by the user")
        )
    dropped: set[str] = set()
    while True:
        knobs = merge(layers)
        merged = layers
        page = knobs.get("page_size")
        if page is not None and page.layer not in ("workload", ESSENTIAL):
            bad_page = kernels.check(spec, workload, {"page_size": page.value})
            if bad_page:
                # Everything computed for another page would be reported too: the page alone
                # is the problem (its layer is dropped, or the user's page is an error).
                if strict or page.layer in ACCOUNTABLE:
                    rank = {layer.name: i for i, layer in enumerate(layers)}
                    raise TuningError([_problem(v, {page.layer}, rank) for v in bad_page])
                faults.append(_dropped(page.layer, bad_page))
                dropped.add(page.layer)
                layers = [layer for layer in layers if layer.name != page.layer]
                continue
            pinned = replace(context, workload=replace(workload, page_size=page.value))
            try:
                again, more = run_policies(plugins, pinned)
            except TuningError as e:  # no kernel can run this page (say, VMEM): its layer's
                if strict or page.layer in ACCOUNTABLE:
                    raise
                message = "knobs break kernel constraints, layer dropped: " + "; ".join(
                    p.message for p in e.problems
                )
                faults.append(Fault(page.layer, message, stage="tune"))
                dropped.add(page.layer)
                layers = [layer for layer in layers if layer.name != page.layer]
                continue
            faults += [f for f in more if f not in faults]
            merged = [layer for layer in again if layer.name not in dropped]
            knobs = merge(merged)
            # The page as chosen, with its provenance. min_page_size (the SMEM floor, set by the
            # baseline alone) does not depend on the page: the rerun gives it as it was.
            knobs["page_size"] = page
        # Trust follows hook order. Every knob's layer has a rank: the rerun's layers first (the
        # knobs come from them), then the first run's (the page came from one of those).
        rank = {n: i for i, n in enumerate(dict.fromkeys(x.name for x in (*merged, *layers)))}
        _derive(workload, knobs, rank)
        defaults = frozenset(k for k, v in knobs.items() if v.layer == ESSENTIAL)
        violations = kernels.check(spec, workload, _values(knobs), defaults=defaults)
        if not violations:
            break
        involved = {v: _layers_of(v, knobs) for v in violations}
        droppable = set().union(*involved.values()) - set(ACCOUNTABLE)
        if strict or not droppable:
            raise TuningError([_problem(v, involved[v], rank) for v in violations])
        for name in sorted(droppable):
            faults.append(_dropped(name, [v for v in violations if name in involved[v]]))
        dropped |= droppable
        layers = [layer for layer in layers if layer.name not in dropped]
    if strict and faults:
        hint = "fix or disable the plugin (TPU_REGISTRY_DISABLE_PLUGINS), or drop strict"
        raise TuningError(
            [Problem(f"policy {f.plugin}", None, "", f.message, hint) for f in faults]
        )
    return Tuning(
        dict(sorted(knobs.items())),
        tuple(layer.name for layer in layers),
        faults=tuple(faults),
        notes=tuple(f"{layer.name}: {layer.note}" for layer in merged if layer.note),
    )


def _dropped(layer: str, violations: list[Violation]) -> Fault:
    message = "knobs break kernel constraints, layer dropped: " + "; ".join(map(str, violations))
    return Fault(layer, message, stage="tune")


def _layers_of(v: Violation, knobs: Mapping[str, Knob]) -> set[str]:
    """Every layer a violation's knobs came from, those they were derived from included."""
    out = set()
    for name in v.knobs:
        if name in knobs:
            out.add(knobs[name].layer)
            out.update(layer for _, layer in knobs[name].derived_from)
    return out


def _problem(v: Violation, layers: set[str], rank: Mapping[str, int]) -> Problem:
    """Blame the most trusted layer involved other than the baseline (the user's own data),
    else the baseline."""
    named = sorted(layers - {ESSENTIAL}, key=rank.__getitem__) or [ESSENTIAL]
    hint = v.hint or "lower the value or remove the override"
    return Problem(f"layer {named[0]}", None, v.knob, f"{v.message} [rule {v.rule}]", hint)
