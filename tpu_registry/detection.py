"""Run the detectors, map their evidence to candidate generations, reconcile, and report.

Reconciliation is declarative: each evidence kind has a trust level (``PRIORITY``). Levels are
taken from most to least trusted; each level narrows the candidate set by intersection.
Evidence that would empty the set disagrees with more trusted evidence and is reported as a
conflict, never silently dropped. Two pieces at the same level that disagree with no more
trusted evidence to decide between them leave the result undecided. An explicit override
(``TPU_REGISTRY_GENERATION`` or ``--simulate``) wins outright and says so. The result depends
only on the set of evidence, not on the order detectors ran in.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .catalog import Catalog
from .errors import DetectionError, Problem, shorten
from .frozen import replace
from .types import EVIDENCE_KINDS, DetectContext, Detection, Evidence, Fault, Finding

# ``slices`` and ``unsupported`` are imported where evidence needs them (a machine type, an
# accelerator type or topology, unrecognised evidence): a host with none starts 1-2 ms sooner.

ENV_TIMEOUT = "TPU_REGISTRY_DETECT_TIMEOUT"
DEFAULT_TIMEOUT_S = 2.0
MAX_TIMEOUT_S = 600.0  # a detector that needs longer is broken; threads cannot wait forever

# How much each kind of evidence is trusted (higher wins). Identifiers read from the hardware
# beat what the environment claims; version numbers that name several generations come last.
PRIORITY: dict[str, int] = {
    "explicit": 100,
    "pci": 80,
    "device_kind": 70,
    "accelerator_type": 60,
    "machine_type": 55,
    "gke_accelerator": 50,
    "torch_xla_version": 30,
    "generation_number": 20,
    "topology": 0,  # carries counts or shape only; names no generation
}
assert set(PRIORITY) == set(EVIDENCE_KINDS)
KINDS = EVIDENCE_KINDS


def candidates_for(catalog: Catalog, ev: Evidence) -> set[str]:
    if ev.kind == "explicit":
        return catalog.find(ev.value)
    if ev.kind == "accelerator_type":
        return catalog.accelerator_prefix(ev.value)[0]
    if ev.kind == "machine_type":
        from .slices import generations_of_machine_type

        return generations_of_machine_type(catalog, ev.value)
    # The catalog strips version numbers itself, and indexes no topology: it names nothing.
    return catalog.lookup(ev.kind, ev.value)


def reconcile(
    catalog: Catalog, evidence: Sequence[Evidence], faults: Sequence[Fault] = ()
) -> Detection:
    """Pure function from evidence to a Detection (no I/O); fuzzed for order independence."""
    # A total order over every field: ties broken by set iteration (hash) order would make the
    # result depend on the order evidence arrived in.
    evidence = sorted(
        set(evidence),
        key=lambda e: (
            -PRIORITY.get(e.kind, -1),
            e.kind,
            e.value,
            e.source,
            e.detector,
            e.count is not None,
            e.count or 0,
            e.count_unit,
            e.scope,
            e.topology is not None,
            e.topology or "",
            e.note,
        ),
    )
    cands = {e: frozenset(candidates_for(catalog, e)) for e in evidence}
    status: dict[Evidence, str] = {}
    conflicts: list[str] = []
    everything = frozenset(catalog.ids())
    current = everything

    explicit = [e for e in evidence if e.kind == "explicit"]
    # --simulate is the caller's question for this one run: it wins over an exported
    # TPU_REGISTRY_GENERATION, which is then reported as overridden (below), not an error.
    explicit = [e for e in explicit if e.detector == "simulate"] or explicit
    if explicit:
        named = {e: cands[e] for e in explicit}  # one id each at most: identifiers are unique
        bad = [e for e in explicit if not named[e]]
        if bad:
            e = bad[0]
            raise DetectionError(
                [
                    Problem(
                        e.source,
                        None,
                        "",
                        f"explicit generation {shorten(e.value)!r} names no generation",
                        "use an id from `tpu-registry list`",
                    )
                ]
            )
        ids = set().union(*named.values())
        if len(ids) > 1:
            raise DetectionError(
                [
                    Problem(
                        "detection",
                        None,
                        "",
                        "explicit overrides disagree: "
                        f"{', '.join(f'{e.source}={e.value}' for e in explicit)}",
                        "set only one",
                    )
                ]
            )
        current = frozenset(ids)
        gid = next(iter(ids))
        simulated = any(e.detector == "simulate" for e in explicit)
        winner_status = "simulated" if simulated else "explicit"
        reason = f"{'simulated' if simulated else 'explicit override'} via {explicit[0].source}"
        for e in explicit:
            status[e] = "decides"
        for e in evidence:  # topology names nothing: "info", like everywhere (below)
            if e in status:
                continue
            if not cands[e]:
                status[e] = "unknown"
            elif gid in cands[e]:
                status[e] = "agrees"
            else:
                status[e] = "overridden"
                conflicts.append(
                    f"{e.source} says {e.value!r} ({', '.join(sorted(cands[e]))}) but "
                    f"{explicit[0].source} overrides it with {gid}"
                )
    else:
        # Pieces that name nothing (topology among them) decide nothing at any level: they are
        # "unknown" (the findings' default), and topology "info" (below).
        levels = sorted({PRIORITY.get(e.kind, -1) for e in evidence}, reverse=True)
        undecided = False  # pragma: no mutate (only its truth is read: None would do as well)
        for level in levels:
            pieces = [e for e in evidence if PRIORITY.get(e.kind, -1) == level]
            known = [e for e in pieces if cands[e]]
            if not known:
                continue
            if undecided:
                for e in known:
                    status[e] = "undecided"
                continue
            together = current.intersection(*(cands[e] for e in known))
            if together:
                for e in known:
                    status[e] = "agrees"
                current = together
                continue
            if current == everything:
                # Equally trusted pieces disagree and nothing more trusted settles it.
                undecided = True
                for e in known:
                    status[e] = "conflict"
                conflicts.append(
                    "; ".join(
                        f"{e.source} says {e.value!r} ({', '.join(sorted(cands[e]))})"
                        for e in known
                    )
                    + " — equally trusted, no winner"
                )
                continue
            # More trusted evidence already narrowed the candidates: pieces that fit them
            # agree, the others are outranked.
            top = next(x for x in evidence if status.get(x) == "agrees")
            fitting = [e for e in known if current & cands[e]]
            for e in known:
                if e in fitting:
                    status[e] = "agrees"
                else:
                    status[e] = "conflict"
                    conflicts.append(
                        f"{e.source} says {e.value!r} ({', '.join(sorted(cands[e]))}) but "
                        f"{top.source} ({top.kind}) says {', '.join(sorted(current))}; {e.kind} "
                        "is trusted less"
                    )
            narrowed = current.intersection(*(cands[e] for e in fitting))
            if fitting and not narrowed:
                undecided = True
                for e in fitting:
                    status[e] = "conflict"
            elif narrowed:
                current = narrowed
        if undecided and (current == everything or len(current) != 1):
            winner_status, reason = (
                "conflict",
                "evidence disagrees and nothing more trusted settles it",
            )
            current = frozenset() if current == everything else current
        elif current == everything:
            # Nothing narrowed the candidates: say which evidence the catalog did not recognise.
            unknown = [e for e in evidence if e.kind != "topology"]
            winner_status, reason = "none", "no TPU evidence found"
            if unknown:
                named = ", ".join(f"{e.kind} {e.value!r} from {e.source}" for e in unknown)
                reason = f"no evidence named a known generation (not recognised: {named})"
                from .unsupported import recognise

                known = {u.name: u for u in (recognise(e.kind, e.value) for e in unknown) if u}
                if known:
                    reason += "; recognised: " + "; ".join(u.text() for u in known.values())
            current = frozenset()
        elif len(current) == 1:
            winner_status = "detected"
            top = next(e for e in evidence if status.get(e) == "agrees")
            reason = f"{top.kind} {top.value!r} from {top.source}"
            if conflicts:
                reason += " (conflicting evidence was outranked)"
            status[top] = "decides"
        else:
            winner_status = "ambiguous"
            reason = f"evidence fits {len(current)} generations: " + ", ".join(sorted(current))

    for e in evidence:
        if e.kind == "topology":
            status[e] = "info"
    # One candidate left is a detected (or explicit) generation: "conflict" keeps two or more,
    # "none" none and "ambiguous" several.
    gid = next(iter(current)) if len(current) == 1 else None
    chips_host, chips_slice, topo, count_notes, refused = _counts(catalog, gid, evidence, status)
    conflicts += count_notes
    slice_, chips_host, shape_conflicts = _shape(
        catalog, gid, evidence, status, chips_host, refused
    )
    conflicts += shape_conflicts
    if slice_ is not None:
        chips_slice, topo = slice_.chips, slice_.topology
    findings = tuple(
        Finding(e, tuple(sorted(cands[e])), status.get(e, "unknown")) for e in evidence
    )
    return Detection(
        generation=gid,
        status=winner_status,
        reason=reason,
        candidates=tuple(sorted(current)),
        chips_per_host=chips_host,
        slice_chips=chips_slice,
        topology=topo,
        slice=slice_,
        findings=findings,
        conflicts=tuple(conflicts),
        faults=tuple(faults),
    )


def _unit(catalog: Catalog, gid: str, ev: Evidence) -> str | None:
    """What ``ev.count`` counts: an accelerator-type suffix counts cores or chips, per the
    catalog (None: a prefix the generation does not have)."""
    if ev.count_unit != "suffix":
        return ev.count_unit
    prefix = catalog.accelerator_prefix(ev.value)[1]
    accel = catalog[gid].identify.accelerator_types
    return next((a.suffix_counts for a in accel if a.prefix == prefix), None)


def _per_chip(chip, unit: str | None) -> int | None:
    return {
        "chips": 1,
        "cores": chip.tensorcores_per_chip,
        "devices": chip.jax_devices_per_chip,
    }.get(unit)


def to_chips(catalog: Catalog, gid: str, ev: Evidence) -> int | None:
    if ev.count is None:
        return None
    per = _per_chip(catalog[gid].chip, _unit(catalog, gid, ev))
    if not per:
        return None
    return max(1, ev.count // per)


def count_problem(catalog: Catalog, gid: str, ev: Evidence) -> str | None:
    """Why the count of ``ev`` cannot be right for generation ``gid`` (None: plausible),
    from the catalog facts every generation has: cores per chip and the pod size. Which slice
    shapes exist is a question for slice data, not this check."""
    if ev.count is None:
        return None
    chip = catalog[gid].chip
    unit = _unit(catalog, gid, ev)
    per = _per_chip(chip, unit)
    if not per:
        return None
    if ev.count % per:
        return f"{ev.count} {unit} is not a whole number of {gid} chips ({per} {unit} per chip)"
    chips = ev.count // per
    if chip.max_pod_chips and chips > chip.max_pod_chips:
        return f"{chips} chips is more than a whole {gid} pod ({chip.max_pod_chips} chips)"
    return None


def _counts(
    catalog: Catalog, gid: str | None, evidence: Sequence[Evidence], status: Mapping[Evidence, str]
) -> tuple[int | None, int | None, str | None, list[str], set[Evidence]]:
    """Chips per host, slice chips and topology, with a note for each count refused and the
    evidence refused (which the slice shape then leaves out too)."""
    host = slice_ = topo = None
    host_ev = slice_ev = None  # pragma: no mutate (each is set before it is read)
    notes: list[str] = []
    refused: set[Evidence] = set()
    if gid is None:
        return None, None, None, notes, refused
    usable = [e for e in evidence if status.get(e) in ("agrees", "decides", "info")]
    per_host = catalog[gid].chip.chips_per_host
    for e in usable:  # already ordered most trusted first
        why = count_problem(catalog, gid, e)
        if e.count is None and e.count_unit == "suffix" and "-" in e.value:
            suffix = e.value.rpartition("-")[2]
            why = f"suffix {suffix[:20]!r}{'...' if len(suffix) > 20 else ''} is not a count"
            why += " (ASCII digits, at most 9)"
        elif e.kind == "topology" and e.count is None:
            why = "not a shape of positive whole numbers (such as 2,2,1 or 2x4)"
        elif (
            e.scope == "host"
            and per_host
            and (chips := to_chips(catalog, gid, e))  # None: no count of chips to compare
            and chips > per_host
        ):
            why = f"{chips} chips per host is more than a {gid} host has ({per_host})"
        if why:
            notes.append(f"{e.source} says {e.value!r}: {why}; its count is not used")
            refused.add(e)
            continue
        chips = to_chips(catalog, gid, e)
        if chips is not None:
            if e.scope == "host" and host is None:
                host, host_ev = chips, e
            elif e.scope == "slice" and slice_ is None:
                slice_, slice_ev = chips, e
        if topo is None and e.topology:
            topo = e.topology
    if host is not None and slice_ is not None and host > slice_:
        notes.append(
            f"{host_ev.source} says {host} chips per host, more than the {slice_}-chip slice "
            f"{slice_ev.source} names; the host count is not used"
        )
        refused.add(host_ev)
        host = None
    if host is None and slice_ is not None and per_host and catalog[gid].slices is None:
        host = min(slice_, per_host)  # no slice data: the physical host is all we know
    return host, slice_, topo, notes, refused


def _shape(
    catalog: Catalog,
    gid: str | None,
    evidence: Sequence[Evidence],
    status: Mapping[Evidence, str],
    host: int | None,
    refused: set[Evidence] | frozenset = frozenset(),
):
    """The slice the evidence describes, chips on this VM, and every disagreement about the
    shape (evidence whose count ``_counts`` refused is left out). The accelerator type names
    the slice; a slice topology refines its shape (same chip count); the machine type picks
    the VM size; host-scope bounds count this VM's chips."""
    if gid is None or catalog[gid].slices is None:
        return None, host, []
    spec = catalog[gid]
    usable = [
        e for e in evidence if status.get(e) in ("agrees", "decides", "info") and e not in refused
    ]
    first = {
        key: next((e for e in usable if pick(e)), None)
        for key, pick in (
            # a bare generation name (torch_xla's get_tpu_type() says 'v6e') names no slice
            ("accel", lambda e: e.kind == "accelerator_type" and "-" in e.value),
            ("topo", lambda e: e.scope == "slice" and bool(e.topology)),
            ("machine", lambda e: e.kind == "machine_type"),
            ("host", lambda e: e.scope == "host" and to_chips(catalog, gid, e) is not None),
            ("hosts", lambda e: e.count_unit == "hosts" and e.count is not None),
        )
    }
    accel, topo, machine = first["accel"], first["topo"], first["machine"]
    if accel is None and topo is None and machine is None:
        return None, host, []  # nothing names a slice or a VM: no slice data is read
    from .slices import SliceError, describe, slice_of, vm_chips

    conflicts: list[str] = []
    # The metadata's path names the machine type last; describe and vm_chips take any case.
    # A machine type that agrees names this generation, so its VMs are in the slice data.
    mt = machine.value.rpartition("/")[2] if machine else None
    record = None
    if accel is not None:
        try:
            record = slice_of(catalog, accel.value)
        except SliceError as e:
            conflicts.append(f"{accel.source} says {accel.value!r}: {e.problems[0].message}")
    if topo is not None:
        try:
            from_topo = describe(spec, topo.topology)  # picked for having one
        except SliceError as e:
            conflicts.append(f"{topo.source} says {topo.value!r}: {e.problems[0].message}")
            from_topo = None
        if from_topo is not None and record is not None and from_topo.chips != record.chips:
            conflicts.append(
                f"{accel.source} says {accel.value!r} ({record.chips} chips, {record.topology}) "
                f"but {topo.source} says {topo.value!r} ({from_topo.chips} chips); the "
                "accelerator type is trusted more"
            )
        elif from_topo is not None:
            record = from_topo  # same chips: the topology says which shape
    if record is not None and mt is not None and mt != record.machine_type:
        try:
            record = describe(spec, record.topology, mt)
        except SliceError as e:
            conflicts.append(f"{machine.source} says {machine.value!r}: {e.problems[0].message}")
    if record is not None and first["hosts"] is not None and first["hosts"].count != record.vms:
        h = first["hosts"]
        conflicts.append(
            f"{h.source} says {h.value!r} ({h.count} hosts) but a {record.topology} "
            f"{spec.id} slice on {record.machine_type} has {record.vms} VMs"
        )
    vm = record.chips_per_vm if record is not None else (vm_chips(spec, mt) if mt else None)
    if host is not None and vm is not None and host != vm:
        h = first["host"]  # the piece _counts took the host count from
        conflicts.append(
            f"{h.source} says {h.value!r} ({host} chips on this VM) but "
            + (
                f"a {record.accelerator_type or record.topology} VM of {record.machine_type}"
                if record is not None
                else f"a {mt} VM"
            )
            + f" has {vm}; the host count is used"
        )
    return record, host if host is not None else vm, conflicts


# ---------------------------------------------------------------------------------------------
# Running detectors
# ---------------------------------------------------------------------------------------------


def detect(
    catalog: Catalog | None = None,
    *,
    simulate: str | None = None,
    allow_runtime_init: bool = False,
    strict: bool = False,
    env: Mapping[str, str] | None = None,
    sysfs_root: Path | str | None = None,
    timeout_s: float | None = None,
) -> Detection:
    """Which TPU generation is this host, and why. Never initialises a TPU runtime unless
    ``allow_runtime_init`` is true. ``strict`` turns detector faults into a DetectionError.
    ``env`` is what detectors read; which plugins are loaded follows the process environment
    (``TPU_REGISTRY_DISABLE_PLUGINS``, ``TPU_REGISTRY_PLUGINS_AUTOLOAD``)."""
    from .catalog import load_catalog
    from .plugins import detect_evidence

    start = time.perf_counter()
    catalog = catalog or load_catalog()
    env = os.environ if env is None else env
    if timeout_s is None:
        try:
            timeout_s = float(env.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
        except ValueError:
            timeout_s = math.nan
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S):
        raise DetectionError(
            f"{ENV_TIMEOUT}={env.get(ENV_TIMEOUT, timeout_s)!r} is not a number of seconds in "
            f"(0, {MAX_TIMEOUT_S:g}] (the default is {DEFAULT_TIMEOUT_S:g})"
        )
    root = Path(sysfs_root if sysfs_root is not None else env.get("TPU_REGISTRY_SYSFS_ROOT", "/"))
    context = DetectContext(
        dict(env), sysfs_root=root, allow_runtime_init=allow_runtime_init, timeout_s=timeout_s
    )
    evidence, faults = detect_evidence(context)
    if simulate:
        note = "simulated: no hardware was consulted for the choice"
        evidence.append(
            Evidence("explicit", simulate, "--simulate", detector="simulate", note=note)
        )
    if strict and faults:
        hint = "fix or disable the plugin (TPU_REGISTRY_DISABLE_PLUGINS)"
        raise DetectionError(
            [Problem(f"detector {f.plugin}", None, "", f.message, hint) for f in faults]
        )
    result = reconcile(catalog, evidence, faults)
    return replace(result, elapsed_ms=(time.perf_counter() - start) * 1000)
