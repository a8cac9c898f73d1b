"""The records hooks take and return: evidence, detections, layers, knobs, faults, contexts.

They sit below every module that produces or consumes them, so a plugin needs only
``import tpu_registry``. All are frozen; optional fields are keyword-only (JAX's ``TpuInfo``
style), so ``Evidence(kind, value, source)`` reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class Evidence:
    """One observation. ``count`` is in ``count_unit`` (chips, cores, devices, or ``suffix``:
    an accelerator-type suffix, whose unit the catalog knows) over ``scope``."""

    kind: str
    value: str
    source: str
    _: KW_ONLY
    count: int | None = None
    count_unit: str = "chips"
    scope: str = "host"  # "host" (this machine) or "slice" (the whole multi-host slice)
    topology: str | None = None
    note: str = ""
    detector: str = ""  # filled in by detection: the plugin that reported it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DetectContext:
    """What a detector may look at. ``env`` is the environment to read (never os.environ)."""

    env: Mapping[str, str]
    _: KW_ONLY
    sysfs_root: Path = Path("/")
    allow_runtime_init: bool = False
    timeout_s: float = 2.0


@dataclass(frozen=True)
class Finding:
    """Evidence with what the catalog made of it."""

    evidence: Evidence
    candidates: tuple[str, ...]
    status: str  # agrees | decides | conflict | unknown | info | overridden | undecided

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.evidence.to_dict(),
            "candidates": list(self.candidates),
            "status": self.status,
        }


@dataclass(frozen=True)
class Fault:
    """A plugin that failed: it could not load, or one of its hook calls raised, timed out,
    returned the wrong thing or broke a kernel rule. Faults are reported, not fatal (``strict``
    makes them errors)."""

    plugin: str
    message: str
    _: KW_ONLY
    stage: str = ""  # load | detect | tune | doctor

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Detection:
    """Which generation this host is, and why."""

    generation: str | None
    status: str  # detected | explicit | simulated | ambiguous | conflict | none
    reason: str
    _: KW_ONLY
    candidates: tuple[str, ...] = ()
    chips_per_host: int | None = None
    slice_chips: int | None = None
    topology: str | None = None
    # The slice this VM is part of (a ``tpu_registry.slices.Slice``), when evidence names one.
    slice: Any = None
    findings: tuple[Finding, ...] = ()
    conflicts: tuple[str, ...] = ()
    faults: tuple[Fault, ...] = ()
    elapsed_ms: float = 0.0

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


@dataclass(frozen=True)
class TuneContext:
    """What a tuning policy may use: everything comes in here, nothing from process state."""

    catalog: Catalog
    spec: Generation
    workload: Workload
    detection: Detection
    _: KW_ONLY
    overrides_path: Path | None = None  # the overrides file in force (argument or env)
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DoctorContext:
    """What ``tpu-registry doctor`` knows: installed versions (from package metadata, nothing
    imported), the configuration it resolved for the workload, and the environment."""

    packages: Mapping[str, str | None]
    _: KW_ONLY
    config: Any = None  # a ResolvedConfig, or None when resolving failed
    error: str = ""
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Layer:
    """A policy's answer: its name and the knobs it sets (a partial mapping)."""

    name: str
    knobs: Mapping[str, Any]
    _: KW_ONLY
    note: str = ""


@dataclass(frozen=True)
class Knob:
    """A final knob value, the layer that set it, and the values of the layers it beat."""

    value: Any
    layer: str
    _: KW_ONLY
    overrode: tuple[tuple[str, Any], ...] = ()
    # Knobs this value was computed from, with the layer of each: ("page_size", "overrides").
    derived_from: tuple[tuple[str, str], ...] = ()

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


@dataclass(frozen=True)
class Violation:
    """A kernel or page rule a set of knobs breaks. ``rule`` names the upstream check it
    mirrors; ``knobs`` are every knob the rule reads (the first is the one reported)."""

    rule: str
    knobs: tuple[str, ...]
    message: str
    _: KW_ONLY
    hint: str = ""

    @property
    def knob(self) -> str:
        return self.knobs[0]

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Tuning:
    """The merged knobs (read-only), the layers merged (most trusted first), policy faults,
    and the notes of the layers merged (``"<layer>: <note>"``)."""

    knobs: Mapping[str, Knob]
    layers: tuple[str, ...]
    _: KW_ONLY
    faults: tuple[Fault, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "knobs", ReadOnlyMap(self.knobs))

    def values(self) -> dict[str, Any]:
        return {k: v.value for k, v in self.knobs.items()}
