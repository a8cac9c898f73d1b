"""Slices: from an accelerator type (``v5p-128``) or a topology (``4x4x8``) to what it is.

One function over each generation's ``[slices]`` data, no per-generation code:

* the shapes a generation offers are its listed ``shapes`` plus, for 3D generations with a
  ``[slices.cubes]`` rule, every ``AxBxC`` whose axes are multiples of the cube edge and at most
  ``max_axis``, with at most ``max_cubes`` cubes and at most ``max_chips`` chips
  (non-decreasing axes if ``sorted_axes``);
* chips are the product of the axes; TensorCores are chips x ``chip.tensorcores_per_chip``; the
  accelerator-type suffix counts chips or cores as ``identify.accelerator_types`` says;
* an accelerator type names a chip count; its topology is the listed shape with that count, else
  the most cube-like offered shape (smallest longest axis, then smallest sum of axes);
* VMs are chips / chips of the machine type (the shape's first, unless another allowed one is
  asked for); hosts are chips / ``chip.chips_per_host`` (a fraction for sub-host slices);
* an axis wraps around when its length is a multiple of ``wrap_axis_multiple``; with a cube
  rule, only slices made of whole cubes wrap at all.
"""

from __future__ import annotations

import math

from .derived import axes_of
from .errors import RegistryError
from .frozen import Frozen, asdict

TYPE_CHECKING = False  # not typing's: detection imports this module
if TYPE_CHECKING:
    from fractions import Fraction
    from typing import Any

    from .catalog import Catalog
    from .spec import Generation, Slices

# Digits only and short: "v5p-٨" or 5,000 digits name no slice.
MAX_SUFFIX_DIGITS = 7


class SliceError(RegistryError):
    """An accelerator type, topology or machine type that names no slice of a generation."""


class Slice(Frozen):
    """One slice shape of one generation and what its VMs are. Figures the sources do not give
    are None."""

    __slots__ = (
        "generation", "accelerator_type", "topology", "chips", "tensorcores", "hosts", "vms",
        "chips_per_vm", "machine_type", "other_machine_types", "wraparound", "gke_accelerator",
        "vcpus_per_vm", "memory_gb_per_vm", "numa_nodes_per_vm", "dcn_gbps_per_chip",
        "ici_bandwidth_bidir_gb_s_per_chip", "ici_link_gb_s_one_way", "ici_link_gb_s_bidir",
    )
    generation: str
    accelerator_type: str | None  # None when the generation lists no accelerator-type prefix
    topology: str
    chips: int
    tensorcores: int
    hosts: int | Fraction  # a Fraction for a sub-host slice (1/8), else an int
    vms: int
    chips_per_vm: int
    machine_type: str
    other_machine_types: tuple[str, ...]
    wraparound: tuple[bool, ...] | None
    gke_accelerator: str | None
    vcpus_per_vm: int | None
    memory_gb_per_vm: float | None
    numa_nodes_per_vm: int | None
    dcn_gbps_per_chip: float | None
    ici_bandwidth_bidir_gb_s_per_chip: float | None
    ici_link_gb_s_one_way: float | None
    ici_link_gb_s_bidir: float | None

    def __init__(
        self,
        generation: str,
        accelerator_type: str | None,
        topology: str,
        chips: int,
        tensorcores: int,
        hosts: int | Fraction,
        vms: int,
        chips_per_vm: int,
        machine_type: str,
        other_machine_types: tuple[str, ...],
        wraparound: tuple[bool, ...] | None,
        gke_accelerator: str | None,
        vcpus_per_vm: int | None,
        memory_gb_per_vm: float | None,
        numa_nodes_per_vm: int | None,
        dcn_gbps_per_chip: float | None,
        ici_bandwidth_bidir_gb_s_per_chip: float | None,
        ici_link_gb_s_one_way: float | None,
        ici_link_gb_s_bidir: float | None,
    ) -> None:
        self._fill(
            generation, accelerator_type, topology, chips, tensorcores, hosts, vms, chips_per_vm,
            machine_type, other_machine_types, wraparound, gke_accelerator, vcpus_per_vm,
            memory_gb_per_vm, numa_nodes_per_vm, dcn_gbps_per_chip,
            ici_bandwidth_bidir_gb_s_per_chip, ici_link_gb_s_one_way, ici_link_gb_s_bidir,
        )

    @property
    def multi_host(self) -> bool:
        return self.vms > 1

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hosts"] = hosts_text(self.hosts)
        out["other_machine_types"] = list(self.other_machine_types)
        out["wraparound"] = list(self.wraparound) if self.wraparound is not None else None
        return out


def _hosts(chips: int, per_host: int) -> int | Fraction:
    """Hosts of a slice: a whole number, or a fraction for a sub-host slice. ``fractions``
    is imported only for the fraction (with its regular expressions, 3 ms on Python 3.12);
    an int equals and hashes as the Fraction of the same value."""
    if chips % per_host == 0:
        return chips // per_host
    from fractions import Fraction

    return Fraction(chips, per_host)


def hosts_text(hosts: int | Fraction) -> str:
    """``1/8`` for a sub-host slice, ``4`` otherwise."""
    return str(hosts.numerator) if hosts.denominator == 1 else f"{hosts}"


def _data(spec: Generation) -> Slices:
    if spec.slices is None:
        raise SliceError(
            f"{spec.id} has no [slices] data in its catalog file (CONTRIBUTING.md, 'Add a "
            "generation', shows how to describe its slices)"
        )
    return spec.slices


def _cube_shapes(data: Slices) -> list[tuple[int, ...]]:
    cubes = data.cubes
    if cubes is None:
        return []
    e, out = cubes.edge, []
    top, longest = cubes.max_cubes, cubes.max_axis // cubes.edge
    for a in range(1, min(top, longest) + 1):
        for b in range(a if cubes.sorted_axes else 1, min(top // a, longest) + 1):
            for c in range(b if cubes.sorted_axes else 1, min(top // (a * b), longest) + 1):
                dims = (a * e, b * e, c * e)
                if math.prod(dims) <= data.max_chips:
                    out.append(dims)
    return out


# Per [slices] table: its shapes, as a tuple and a set, and the default shape per chip count.
# Models are frozen; each entry keeps its table alive, so the id cannot be reused.
_shapes_cache: dict[int, tuple[Slices, tuple[str, ...], frozenset[str], dict[int, str]]] = {}


def _offered(data: Slices) -> tuple[tuple[str, ...], frozenset[str], dict[int, str]]:
    hit = _shapes_cache.get(id(data))
    if hit is None or hit[0] is not data:
        shapes = tuple(_topologies(data))
        defaults: dict[int, tuple[int, ...]] = {}
        for dims in map(axes_of, shapes[len(data.shapes) :]):  # the most cube-like wins
            n = math.prod(dims)
            if n not in defaults or (max(dims), sum(dims), dims) < (
                max(defaults[n]),
                sum(defaults[n]),
                defaults[n],
            ):
                defaults[n] = dims
        by_chips = {n: "x".join(map(str, d)) for n, d in defaults.items()}
        for s in reversed(data.shapes):  # a listed shape is the default for its chip count
            by_chips[math.prod(axes_of(s.topology))] = s.topology
        hit = _shapes_cache[id(data)] = (data, shapes, frozenset(shapes), by_chips)
    return hit[1], hit[2], hit[3]


def topologies(spec: Generation) -> list[str]:
    """Every topology the generation offers: listed shapes first, then cube-rule shapes by
    chip count."""
    return list(_offered(_data(spec))[0])


def _topologies(data: Slices) -> list[str]:
    listed = [s.topology for s in data.shapes]
    seen = set(listed)
    rest = sorted(
        (d for d in _cube_shapes(data) if "x".join(map(str, d)) not in seen),
        key=lambda d: (math.prod(d), d),
    )
    return listed + ["x".join(map(str, d)) for d in rest]


def _default_topology(spec: Generation, chips: int) -> str | None:
    """The listed shape with this many chips (the first), else the most cube-like one:
    smallest longest axis, then smallest sum of axes."""
    return _offered(_data(spec))[2].get(chips)


def _suffix_unit(spec: Generation) -> tuple[str, str] | None:
    if not spec.identify.accelerator_types:
        return None
    a = spec.identify.accelerator_types[0]
    return a.prefix, a.suffix_counts


def describe(spec: Generation, topology: str, machine_type: str | None = None) -> Slice:
    """The slice of ``spec`` with this topology (as written in the data: ``2x4``, ``4x4x8``).
    ``machine_type`` picks one of the VM types the shape allows (default: the first)."""
    data = _data(spec)
    topo = topology.strip().lower()
    offered, known, _ = _offered(data)
    if topo not in known:
        sample = ", ".join(offered[:8]) + (", ..." if len(offered) > 8 else "")
        raise SliceError(
            f"{spec.id} offers no slice of topology {topology!r} (offered: {sample}; "
            f"`tpu-registry slice --list --generation {spec.id}` lists all)"
        )
    shape = next((s for s in data.shapes if s.topology == topo), None)
    allowed = list(shape.machine_types) if shape and shape.machine_types else [data.machine_type]
    chosen = machine_type.strip().lower() if machine_type else allowed[0]
    if chosen not in allowed:
        raise SliceError(
            f"a {spec.id} slice of topology {topo} does not run on machine type {chosen!r} "
            f"(it runs on {', '.join(allowed)})"
        )
    vm = next(v for v in data.vm_types if v.machine_type == chosen)
    dims = axes_of(topo)
    chips = math.prod(dims)
    cores = chips * spec.chip.tensorcores_per_chip
    named = _suffix_unit(spec)
    wrap = None
    if data.wrap_axis_multiple:
        whole = data.cubes is None or all(d % data.cubes.edge == 0 for d in dims)
        wrap = tuple(whole and d % data.wrap_axis_multiple == 0 for d in dims)
    per_host = spec.chip.chips_per_host or vm.chips
    return Slice(
        generation=spec.id,
        accelerator_type=(
            f"{named[0]}-{cores if named[1] == 'cores' else chips}" if named else None
        ),
        topology=topo,
        chips=chips,
        tensorcores=cores,
        hosts=_hosts(chips, per_host),
        vms=chips // vm.chips,
        chips_per_vm=vm.chips,
        machine_type=chosen,
        other_machine_types=tuple(m for m in allowed if m != chosen),
        wraparound=wrap,
        gke_accelerator=spec.identify.gke_accelerators[0]
        if spec.identify.gke_accelerators
        else None,
        vcpus_per_vm=vm.vcpus,
        memory_gb_per_vm=vm.memory_gb,
        numa_nodes_per_vm=vm.numa_nodes,
        dcn_gbps_per_chip=data.dcn_gbps_per_chip,
        ici_bandwidth_bidir_gb_s_per_chip=spec.chip.ici_bandwidth_bidir_gb_s_per_chip,
        ici_link_gb_s_one_way=data.ici_link_gb_s_one_way,
        ici_link_gb_s_bidir=data.ici_link_gb_s_bidir,
    )


def chips_of_accelerator_type(spec: Generation, accelerator_type: str) -> int:
    """``v5p-128`` -> 64 chips (the suffix counts cores on v5p). Raises SliceError."""
    named = _suffix_unit(spec)
    if named is None:
        raise SliceError(f"{spec.id} lists no accelerator-type prefix (identify.accelerator_types)")
    prefix, unit = named
    text = accelerator_type.strip().lower()
    head, _, tail = text.rpartition("-")
    ok = tail.isascii() and tail.isdecimal() and len(tail) <= MAX_SUFFIX_DIGITS
    if head != prefix or not ok:
        raise SliceError(
            f"{accelerator_type!r} is not a {spec.id} accelerator type (write {prefix}-N, N the "
            f"number of {unit})"
        )
    n = int(tail)
    per = spec.chip.tensorcores_per_chip if unit == "cores" else 1
    if n <= 0 or n % per:
        raise SliceError(
            f"{accelerator_type!r}: the suffix counts {unit} ({per} per chip), so it must be a "
            f"positive multiple of {per}"
        )
    return n // per


def slice_of(
    catalog: Catalog,
    text: str,
    *,
    generation: str | None = None,
    machine_type: str | None = None,
) -> Slice:
    """The slice an accelerator type (``v5p-128``) or a topology (``4x4x8``, with
    ``generation``) names. Raises SliceError (a RegistryError) with the fix in the message."""
    text = text.strip()
    if not text:
        raise SliceError("give an accelerator type (v5p-128) or a topology (4x4x8)")
    is_topology = all(p.isascii() and p.isdecimal() for p in text.lower().split("x"))
    if is_topology:
        if not generation:
            raise SliceError(f"topology {text!r} names no generation: add --generation (e.g. v5p)")
        return describe(catalog.get(generation), text, machine_type)
    hits, _prefix, _n = catalog.accelerator_prefix(text)
    if len(hits) != 1:
        raise SliceError(
            f"{text!r} is not an accelerator type of any generation (write PREFIX-N such as "
            "v5p-128, v6e-16, v5litepod-8, tpu7x-8)"
        )
    spec = catalog[next(iter(hits))]
    if generation and catalog.get(generation).id != spec.id:
        raise SliceError(f"{text!r} is a {spec.id} accelerator type, not {generation}")
    chips = chips_of_accelerator_type(spec, text)
    topo = _default_topology(spec, chips)
    if topo is None:
        raise SliceError(
            f"{spec.id} offers no slice of {chips} chips ({text}); the largest single slice "
            f"has {_data(spec).max_chips} chips"
        )
    return describe(spec, topo, machine_type)


def all_slices(spec: Generation) -> list[Slice]:
    """Every offered topology with its default machine type (and each alternative)."""
    out = []
    for topo in topologies(spec):
        first = describe(spec, topo)
        out.append(first)
        out += [describe(spec, topo, m) for m in first.other_machine_types]
    return out


def generations_of_machine_type(catalog: Catalog, machine_type: str) -> set[str]:
    """Generations whose VMs run as this GCE machine type (``ct6e-standard-4t`` -> v6e)."""
    name = machine_type.strip().lower().rpartition("/")[2]  # metadata: projects/N/machineTypes/X
    return {
        spec.id
        for spec in catalog
        if spec.slices and any(v.machine_type == name for v in spec.slices.vm_types)
    }


def vm_chips(spec: Generation, machine_type: str) -> int | None:
    """Chips on a VM of this machine type, or None when the generation does not list it."""
    name = machine_type.strip().lower().rpartition("/")[2]
    if spec.slices is None:
        return None
    return next((v.chips for v in spec.slices.vm_types if v.machine_type == name), None)
