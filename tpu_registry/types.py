"""The records hooks take and return: evidence, detections, layers, knobs, faults, contexts.

They sit below every module that produces or consumes them, so a plugin needs only
``import tpu_registry``. All are frozen; optional fields are keyword-only (JAX's ``TpuInfo``
style), so ``Evidence(kind, value, source)`` reads the same everywhere. They are
``frozen.Frozen`` records, which behave as frozen dataclasses (``dataclasses.replace()`` works)
without importing ``dataclasses`` on the way to ``detect()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .frozen import Frozen, asdict

TYPE_CHECKING = False  # not typing's: detection imports this module, and typing costs ms
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from .catalog import Catalog
    from .spec import Generation
    from .workload import Workload


def _plain(value: Any) -> Any:
    """Tuples as lists, for JSON."""
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- detection

# What evidence can be about. Detection ranks them (``detection.PRIORITY``).
EVIDENCE_KINDS = (
    "explicit",  # TPU_REGISTRY_GENERATION or --simulate: names a generation outright
    "pci",
    "device_kind",
    "accelerator_type",
    "machine_type",  # the GCE machine type of this VM (ct6e-standard-4t): generation and VM size
    "gke_accelerator",
    "torch_xla_version",
    "generation_number",
    "topology",  # counts or a shape only; names no generation
)


class Evidence(Frozen):
    """One observation. ``count`` is in ``count_unit`` (chips, cores, devices, or ``suffix``:
    an accelerator-type suffix, whose unit the catalog knows) over ``scope``."""

    __slots__ = (
        "kind", "value", "source", "count", "count_unit", "scope", "topology", "note", "detector"
    )
    kind: str
    value: str
    source: str
    count: int | None
    count_unit: str
    scope: str  # "host" (this machine) or "slice" (the whole multi-host slice)
    topology: str | None
    note: str
    detector: str  # filled in by detection: the plugin that reported it

    def __init__(
        self,
        kind: str,
        value: str,
        source: str,
        *,
        count: int | None = None,
        count_unit: str = "chips",
        scope: str = "host",
        topology: str | None = None,
        note: str = "",
        detector: str = "",
    ) -> None:
        self._fill(kind, value, source, count, count_unit, scope, topology, note, detector)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DetectContext(Frozen):
    """What a detector may look at. ``env`` is the environment to read (never os.environ)."""

    __slots__ = ("env", "sysfs_root", "allow_runtime_init", "timeout_s")
    env: Mapping[str, str]
    sysfs_root: Path
    allow_runtime_init: bool
    timeout_s: float

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        sysfs_root: Path = Path("/"),
        allow_runtime_init: bool = False,
        timeout_s: float = 2.0,
    ) -> None:
        self._fill(env, sysfs_root, allow_runtime_init, timeout_s)


class Finding(Frozen):
    """Evidence with what the catalog made of it."""

    __slots__ = ("evidence", "candidates", "status")
    evidence: Evidence
    candidates: tuple[str, ...]
    status: str  # agrees | decides | conflict | unknown | info | overridden | undecided

    def __init__(self, evidence: Evidence, candidates: tuple[str, ...], status: str) -> None:
        self._fill(evidence, candidates, status)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.evidence.to_dict(),
            "candidates": list(self.candidates),
            "status": self.status,
        }


class Fault(Frozen):
    """A plugin that failed: it could not load, or one of its hook calls raised, timed out,
    returned the wrong thing or broke a kernel rule. Faults are reported, not fatal (``strict``
    makes them errors)."""

    __slots__ = ("plugin", "message", "stage")
    plugin: str
    message: str
    stage: str  # load | detect | tune | doctor

    def __init__(self, plugin: str, message: str, *, stage: str = "") -> None:
        self._fill(plugin, message, stage)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class Detection(Frozen):
    """Which generation this host is, and why."""

    __slots__ = (
        "generation", "status", "reason", "candidates", "chips_per_host", "slice_chips",
        "topology", "slice", "findings", "conflicts", "faults", "elapsed_ms",
    )
    generation: str | None
    status: str  # detected | explicit | simulated | ambiguous | conflict | none
    reason: str
    candidates: tuple[str, ...]
    chips_per_host: int | None
    slice_chips: int | None
    topology: str | None
    # The slice this VM is part of (a ``tpu_registry.slices.Slice``), when evidence names one.
    slice: Any
    findings: tuple[Finding, ...]
    conflicts: tuple[str, ...]
    faults: tuple[Fault, ...]
    elapsed_ms: float

    def __init__(
        self,
        generation: str | None,
        status: str,
        reason: str,
        *,
        candidates: tuple[str, ...] = (),
        chips_per_host: int | None = None,
        slice_chips: int | None = None,
        topology: str | None = None,
        slice: Any = None,
        findings: tuple[Finding, ...] = (),
        conflicts: tuple[str, ...] = (),
        faults: tuple[Fault, ...] = (),
        elapsed_ms: float = 0.0,
    ) -> None:
        self._fill(
            generation, status, reason, candidates, chips_per_host, slice_chips, topology,
            slice, findings, conflicts, faults, elapsed_ms,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "status": self.status,
            "reason": self.reason,
            "candidates": list(self.candidates),
            "chips_per_host": self.chips_per_host,
            "slice_chips": self.slice_chips,
            "topology": self.topology,
            "slice": self.slice.to_dict() if self.slice is not None else None,
            "evidence": [f.to_dict() for f in self.findings],
            "conflicts": list(self.conflicts),
            "faults": [f.to_dict() for f in self.faults],
        }


# --------------------------------------------------------------------------- tuning


class TuneContext(Frozen):
    """What a tuning policy may use: everything comes in here, nothing from process state."""

    __slots__ = ("catalog", "spec", "workload", "detection", "overrides_path", "env")
    catalog: Catalog
    spec: Generation
    workload: Workload
    detection: Detection
    overrides_path: Path | None  # the overrides file in force (argument or env)
    env: Mapping[str, str]

    def __init__(
        self,
        catalog: Catalog,
        spec: Generation,
        workload: Workload,
        detection: Detection,
        *,
        overrides_path: Path | None = None,
        env: Mapping[str, str] | None = None,  # None: an empty environment
    ) -> None:
        self._fill(catalog, spec, workload, detection, overrides_path, {} if env is None else env)


class DoctorContext(Frozen):
    """What ``tpu-registry doctor`` knows: installed versions (from package metadata, nothing
    imported), the configuration it resolved for the workload, and the environment."""

    __slots__ = ("packages", "config", "error", "env")
    packages: Mapping[str, str | None]
    config: Any  # a ResolvedConfig, or None when resolving failed
    error: str
    env: Mapping[str, str]

    def __init__(
        self,
        packages: Mapping[str, str | None],
        *,
        config: Any = None,
        error: str = "",
        env: Mapping[str, str] | None = None,  # None: an empty environment
    ) -> None:
        self._fill(packages, config, error, {} if env is None else env)


class Layer(Frozen):
    """A policy's answer: its name and the knobs it sets (a partial mapping)."""

    __slots__ = ("name", "knobs", "note")
    name: str
    knobs: Mapping[str, Any]
    note: str

    def __init__(self, name: str, knobs: Mapping[str, Any], *, note: str = "") -> None:
        self._fill(name, knobs, note)


class Knob(Frozen):
    """A final knob value, the layer that set it, and the values of the layers it beat."""

    __slots__ = ("value", "layer", "overrode", "derived_from")
    value: Any
    layer: str
    overrode: tuple[tuple[str, Any], ...]
    # Knobs this value was computed from, with the layer of each: ("page_size", "overrides").
    derived_from: tuple[tuple[str, str], ...]

    def __init__(
        self,
        value: Any,
        layer: str,
        *,
        overrode: tuple[tuple[str, Any], ...] = (),
        derived_from: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._fill(value, layer, overrode, derived_from)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "value": _plain(self.value),
            "layer": self.layer,
            "overrode": [{"layer": n, "value": _plain(v)} for n, v in self.overrode],
        }
        if self.derived_from:
            out["derived_from"] = [{"knob": k, "layer": lay} for k, lay in self.derived_from]
        return out

    def provenance(self) -> str:
        """``baseline; derived from page_size [overrides]; beat tables=64``."""
        text = self.layer
        if self.derived_from:
            text += "; derived from " + ", ".join(f"{k} [{lay}]" for k, lay in self.derived_from)
        if self.overrode:
            text += "; beat " + ", ".join(f"{n}={format_value(v)}" for n, v in self.overrode)
        return text


class ReadOnlyMap(Mapping):
    """A mapping nobody can change after it is built (cached results are shared), picklable."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] = ()) -> None:
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("read-only")

    def __reduce__(self):
        return (ReadOnlyMap, (self._data,))

    def __repr__(self) -> str:
        return f"ReadOnlyMap({self._data!r})"


def format_value(v: Any) -> str:
    return ",".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


class Violation(Frozen):
    """A kernel or page rule a set of knobs breaks. ``rule`` names the upstream check it
    mirrors; ``knobs`` are every knob the rule reads (the first is the one reported)."""

    __slots__ = ("rule", "knobs", "message", "hint")
    rule: str
    knobs: tuple[str, ...]
    message: str
    hint: str

    def __init__(self, rule: str, knobs: tuple[str, ...], message: str, *, hint: str = "") -> None:
        self._fill(rule, knobs, message, hint)

    @property
    def knob(self) -> str:
        return self.knobs[0]

    def __str__(self) -> str:
        return self.message


class Tuning(Frozen):
    """The merged knobs (read-only), the layers merged (most trusted first), policy faults,
    and the notes of the layers merged (``"<layer>: <note>"``)."""

    __slots__ = ("knobs", "layers", "faults", "notes")
    knobs: Mapping[str, Knob]
    layers: tuple[str, ...]
    faults: tuple[Fault, ...]
    notes: tuple[str, ...]

    def __init__(
        self,
        knobs: Mapping[str, Knob],
        layers: tuple[str, ...],
        *,
        faults: tuple[Fault, ...] = (),
        notes: tuple[str, ...] = (),
    ) -> None:
        knobs = knobs if isinstance(knobs, ReadOnlyMap) else ReadOnlyMap(knobs)  # shared: read-only
        self._fill(knobs, layers, faults, notes)

    def values(self) -> dict[str, Any]:
        return {k: v.value for k, v in self.knobs.items()}
