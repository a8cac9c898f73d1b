"""The schema of one generation file (``hardware/*.toml``).

Every model is frozen and forbids unknown keys. Units are part of the field names; all
figures are per chip unless the name says ``per_core``. Sanity ranges are deliberately wide
(they catch unit slips such as Gbps-for-GB/s, not plausible future chips).
"""

from __future__ import annotations

import math
import unicodedata
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .derived import ChipDerived, axes_of
from .modelerrors import data_error

SCHEMA_VERSION = 1

Dtype = Literal["f32", "bf16", "int8", "int4", "fp8"]
Topology = Literal["2d_torus", "3d_torus", "3d_torus_ocs", "other"]
KernelFamily = Literal["rpa_v2", "rpa_v3", "rpa_v3_hd64", "mla_v2"]


def identifier(value: str, what: str, at: tuple = ()) -> str:
    """An identifier (alias, device kind, GKE label) in its NFKC form, which must be printable
    ASCII without surrounding space: identifiers are matched exactly, and a homoglyph (a
    Cyrillic і in "trillium"), a zero-width space or a NUL would name something no one can
    type or tell apart on screen."""
    text = unicodedata.normalize("NFKC", value)
    if not text.strip():
        raise data_error(f"{what} is empty or only whitespace", "remove it, or fill it in", at)
    bad = next((c for c in text if not " " <= c <= "~"), None)
    if bad is not None:
        name = unicodedata.name(bad, "a control character")
        raise data_error(
            f"{what} {ascii(value)} is not printable ASCII (U+{ord(bad):04X} {name})",
            "identifiers are matched exactly: write them in plain ASCII letters, digits and "
            "punctuation",
            at,
        )
    if text != text.strip():
        raise data_error(
            f"{what} {value!r} starts or ends with whitespace", "remove the spaces", at
        )
    return text


def identifiers_list(values: list[str], what: str) -> list[str]:
    return [identifier(v, what, (i,)) for i, v in enumerate(values)]


def printable_name(value: str) -> str:
    """A display name may be any printable text, but not blank, and no control characters
    (an escape sequence or newline in a name would forge lines of `tpu-registry list`)."""
    if not value.strip():
        raise data_error("name is empty or only whitespace", "write the generation's name")
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise data_error(
            f"name {ascii(value)} holds a control or invisible character (U+{ord(bad):04X})",
            "write the name on one line, with printable characters only",
        )
    return value


class DataModel(BaseModel):
    """Base of every data-file model: frozen, strict, no unknown keys, no nan or inf."""

    # TOML allows nan and inf; no figure here may be either (nan passes no range check).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _range(lo: float, hi: float, *, gt: bool = True):
    return Field(gt=lo, le=hi) if gt else Field(ge=lo, le=hi)


class Chip(DataModel, ChipDerived):
    """Per-chip facts. Mirrors JAX's ``TpuInfo`` but per chip, with units in every name."""

    tensorcores_per_chip: Annotated[int, _range(0, 16)]
    mxus_per_core: Annotated[int, _range(0, 64)]
    mxu_rows: Annotated[int, _range(0, 4096)]
    mxu_cols: Annotated[int, _range(0, 4096)]
    sparsecores_per_chip: Annotated[int, _range(0, 64, gt=False)]
    hbm_gib: Annotated[float, _range(0, 4096)]
    hbm_bandwidth_gb_s: Annotated[float, _range(10, 100_000)]
    peak_bf16_tflops: Annotated[float, _range(0, 100_000)]
    peak_int8_tops: Annotated[float, _range(0, 200_000)] | None = None
    peak_fp8_tflops: Annotated[float, _range(0, 200_000)] | None = None
    # Dtypes the MXUs multiply at a rated speed (a peak in Cloud's or JAX's TpuInfo tables).
    # Not JAX's ``is_matmul_supported``, which says what Pallas/Mosaic lowers without a cast:
    # f32 only on v2/v3 (whose bf16 rate JAX's own table lists), fp8 inputs on v5e (whose fp8
    # rate JAX lists as 0).
    matmul_dtypes: list[Dtype] = Field(min_length=1)
    vmem_mib_per_core: Annotated[float, _range(1, 4096, gt=False)]
    smem_kib_per_core: Annotated[int, _range(1, 65536, gt=False)]
    lanes: Annotated[int, _range(0, 4096)]
    sublanes: Annotated[int, _range(0, 256)]
    ici_bandwidth_bidir_gb_s_per_chip: Annotated[float, _range(0, 100_000)] | None = None
    ici_ports_per_chip: Annotated[int, _range(0, 64)] | None = None
    # None: not published yet (allowed only in provisional files).
    topology: Topology | None = None
    max_pod_chips: Annotated[int, _range(0, 1_000_000)] | None = None
    chips_per_host: Annotated[int, _range(0, 256)] | None = None
    jax_devices_per_chip: Annotated[int, _range(0, 16)]

    @field_validator("mxu_rows", "mxu_cols")
    @classmethod
    def _mxu_multiple_of_128(cls, v: int) -> int:
        if v % 128:
            raise data_error(
                f"must be a multiple of 128, got {v}",
                "MXUs are 128x128 or 256x256; check rows and columns",
            )
        return v

    @field_validator("lanes")
    @classmethod
    def _lanes_pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise data_error(f"must be a power of two, got {v}", "TPU vector lanes are 128")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Chip:
        if self.peak_int8_tops is not None and "int8" not in self.matmul_dtypes:
            raise data_error(
                "peak_int8_tops is set but 'int8' is not in matmul_dtypes",
                'add "int8" to chip.matmul_dtypes, or remove chip.peak_int8_tops',
                ("peak_int8_tops",),
            )
        if self.peak_fp8_tflops is not None and "fp8" not in self.matmul_dtypes:
            raise data_error(
                "peak_fp8_tflops is set but 'fp8' is not in matmul_dtypes",
                'add "fp8" to chip.matmul_dtypes, or remove chip.peak_fp8_tflops',
                ("peak_fp8_tflops",),
            )
        if self.vmem_mib_per_core * self.tensorcores_per_chip >= self.hbm_gib * 1024:
            raise data_error(
                f"VMEM per chip must be smaller than HBM per chip ({self.vmem_mib_per_core:g} MiB "
                f"x {self.tensorcores_per_chip} cores >= {self.hbm_gib:g} GiB)",
                "vmem_mib_per_core is MiB per core and hbm_gib is GiB per chip; check both units",
                ("vmem_mib_per_core",),
            )
        if self.jax_devices_per_chip > self.tensorcores_per_chip:
            raise data_error(
                "jax_devices_per_chip cannot exceed tensorcores_per_chip",
                "JAX shows at most one device per TensorCore",
                ("jax_devices_per_chip",),
            )
        if self.chips_per_host and self.max_pod_chips and self.chips_per_host > self.max_pod_chips:
            raise data_error(
                "chips_per_host cannot exceed max_pod_chips",
                "check both counts",
                ("chips_per_host",),
            )
        return self

    # Derived values used by tuning (vmem_bytes_per_core, ...) come from ChipDerived.


class AcceleratorType(DataModel):
    """A Cloud accelerator-type prefix (``v5p`` in ``v5p-128``) and what its suffix counts."""

    prefix: str = Field(min_length=1, pattern=r"^[a-z0-9]+$")
    suffix_counts: Literal["cores", "chips"]


class PciId(DataModel):
    vendor: Annotated[int, Field(ge=0, le=0xFFFF)]
    device: Annotated[int, Field(ge=0, le=0xFFFF)]
    subsystem_device: Annotated[int, Field(ge=0, le=0xFFFF)] | None = None


class Identify(DataModel):
    """Strings that name this generation. Detectors report them raw; the catalog maps them."""

    device_kinds: list[str] = Field(default_factory=list)
    accelerator_types: list[AcceleratorType] = Field(default_factory=list)
    gke_accelerators: list[str] = Field(default_factory=list)
    pci: list[PciId] = Field(default_factory=list)
    torch_xla_versions: list[Annotated[int, Field(ge=1, le=99)]] = Field(default_factory=list)

    @field_validator("device_kinds")
    @classmethod
    def _device_kinds(cls, v: list[str]) -> list[str]:
        return identifiers_list(v, "device kind")

    @field_validator("gke_accelerators")
    @classmethod
    def _gke(cls, v: list[str]) -> list[str]:
        return identifiers_list(v, "GKE accelerator label")


class RpaV2Facts(DataModel):
    """Defaults of the RPA v2 kernel (torch_xla / JAX ``ragged_paged_attention``)."""

    default_num_kv_pages_per_block: Annotated[int, Field(gt=0, le=4096)]
    default_num_queries_per_block: Annotated[int, Field(gt=0, le=4096)]
    # torch_xla halves the KV block while the block matrices would take this much VMEM or more.
    halve_kv_block_at_vmem_mib: Annotated[float, Field(ge=1, le=4096)] | None = None
    vmem_limit_mib: Annotated[float, Field(ge=1, le=4096)]


class RpaV3Facts(DataModel):
    """Parameters of tpu-inference's RPA v3 default block-size heuristic.

    Upstream switches on the TPU version; these fields carry the same numbers as data:
    prefill/mixed ``bq = min(q_budget // q_per_kv, max_q // q_max_divisor)`` and
    ``bkv = min(kv_tokens, max_kv // kv_max_divisor)``; compute sizes likewise with the
    ``chunk_*`` fields; decode
    ``bkv = decode_kv_bytes * kv_packing // 4 // head_dim // kv_heads_x2``.
    """

    # Ranges are wide around upstream's numbers (16 MiB, budgets of 512-2048 tokens,
    # divisors 1-2): a value outside is a slip that would break every resolve, so `validate`
    # refuses it rather than `resolve` blaming the user's overrides.
    decode_kv_bytes: Annotated[int, Field(ge=1 << 20, le=1 << 30)]
    prefill_q_budget: Annotated[int, Field(ge=1, le=65536)]
    prefill_q_max_divisor: Annotated[int, Field(ge=1, le=8)]
    prefill_kv_tokens: Annotated[int, Field(ge=1, le=1 << 20)]
    prefill_kv_max_divisor: Annotated[int, Field(ge=1, le=8)]
    chunk_q_budget: Annotated[int, Field(ge=1, le=65536)]
    chunk_q_max_divisor: Annotated[int, Field(ge=1, le=8)]
    chunk_kv_tokens: Annotated[int, Field(ge=1, le=1 << 20)]
    # Tuned-table miss fallback of the older v3 kernel: KV tokens per block.
    kv_tokens_per_block: Annotated[int, Field(ge=1, le=1 << 20)]
    # None means "the whole VMEM of the core", as tpu-inference does today.
    vmem_limit_mib: Annotated[float, Field(ge=1, le=4096)] | None = None


class RpaV3Hd64Facts(DataModel):
    """Defaults of tpu-inference's head-dim-64 RPA v3 kernel (``kernel_hd64.py``).

    On a tuned-table miss ``get_tuned_block_sizes`` takes ``fallback_kv_tokens // page_size``
    KV pages and ``fallback_queries`` queries per block (switching on the TPU version
    upstream), both clamped per call; without a ``vmem_limit_bytes`` the kernel passes
    ``DEFAULT_VMEM_LIMIT_BYTES``.
    """

    fallback_kv_tokens: Annotated[int, Field(gt=0, le=1 << 20)]
    fallback_queries: Annotated[int, Field(gt=0, le=1 << 16)]
    vmem_limit_mib: Annotated[float, Field(gt=0, le=4096)]


class MlaCaseFacts(DataModel):
    """One case of ``mla/v2/tuned_params.get_tuned_params``'s fallback ``TunableParams``."""

    num_kv_pages_per_block: Annotated[int, Field(gt=0, le=1 << 16)]
    num_queries_per_block: Annotated[int, Field(gt=0, le=1 << 16)]
    decode_batch_size: Annotated[int, Field(gt=0, le=1 << 16)] = 1
    q_split: Annotated[int, Field(gt=0, le=1 << 16)] = 1


class MlaV2Facts(DataModel):
    """Defaults of tpu-inference's MLA v2 kernel and its vLLM backend.

    ``page_size`` is ``PallasMLAttentionBackend.get_page_size``; ``kv_packing`` the default of
    ``MLA_KV_PACKING_SIZE`` (tokens per packed cache row, whatever the dtype); ``decode`` and
    ``mixed`` the fallbacks of ``get_tuned_params`` (prefill uses the mixed ones upstream).
    The kernel gets no VMEM limit from tpu-inference and takes the core's whole VMEM.
    """

    page_size: Annotated[int, Field(gt=0, le=1 << 16)]
    kv_packing: Annotated[int, Field(gt=0, le=1 << 12)]
    decode: MlaCaseFacts
    mixed: MlaCaseFacts


class Kernels(DataModel):
    families: list[KernelFamily] = Field(default_factory=list)
    rpa_v2: RpaV2Facts | None = None
    rpa_v3: RpaV3Facts | None = None
    rpa_v3_hd64: RpaV3Hd64Facts | None = None
    mla_v2: MlaV2Facts | None = None

    @model_validator(mode="after")
    def _facts_for_families(self) -> Kernels:
        for fam in self.families:
            if getattr(self, fam) is None:
                raise data_error(
                    f"'{fam}' is listed in families but [kernels.{fam}] is missing",
                    f"add a [kernels.{fam}] table, or remove '{fam}' from families",
                    ("families",),
                )
        return self


_TOPOLOGY = r"^[1-9][0-9]{0,3}(x[1-9][0-9]{0,3}){1,2}$"


class VmType(DataModel):
    """A GCE machine type that TPU VMs of this generation run as, and the host facts users
    ask about. Unpublished figures stay unset."""

    machine_type: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)+$", max_length=64)
    chips: Annotated[int, Field(gt=0, le=64)]
    vcpus: Annotated[int, Field(gt=0, le=4096)] | None = None
    memory_gb: Annotated[float, Field(gt=0, le=65536)] | None = None
    numa_nodes: Annotated[int, Field(gt=0, le=64)] | None = None


class Shape(DataModel):
    """A slice shape listed by name, and the machine types its VMs may be (first: the one the
    TPU API creates; others: what GKE also accepts). Unset: ``slices.machine_type``."""

    topology: str = Field(pattern=_TOPOLOGY)
    machine_types: list[str] = Field(default_factory=list)


class Cubes(DataModel):
    """The rule for slices built of whole cubes (3D generations): every axis a multiple of
    ``edge`` and at most ``max_axis`` long, at most ``max_cubes`` cubes, axes written in
    non-decreasing order if ``sorted_axes``."""

    edge: Annotated[int, Field(gt=1, le=64)]
    max_cubes: Annotated[int, Field(gt=0, le=100_000)]
    max_axis: Annotated[int, Field(gt=1, le=100_000)]  # no axis is longer
    sorted_axes: bool = True


class Slices(DataModel):
    """Which slices a generation offers and what they run on. ``tpu_registry.slices`` maps an
    accelerator type or topology to a slice record over this data; no per-generation code."""

    axes: Literal[2, 3]
    machine_type: str  # the VM type of shapes that name none (multi-host slices)
    max_chips: Annotated[int, Field(gt=0, le=1_000_000)]  # the largest single slice
    shapes: list[Shape] = Field(min_length=1)
    cubes: Cubes | None = None
    # An axis wraps around (a ring, not a line) when its length is a multiple of this.
    wrap_axis_multiple: Annotated[int, Field(gt=1, le=64)] | None = None
    dcn_gbps_per_chip: Annotated[float, Field(gt=0, le=100_000)] | None = None
    ici_link_gb_s_one_way: Annotated[float, Field(gt=0, le=100_000)] | None = None
    ici_link_gb_s_bidir: Annotated[float, Field(gt=0, le=100_000)] | None = None
    vm_types: list[VmType] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Slices:
        names = [v.machine_type for v in self.vm_types]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise data_error(
                f"machine type {dup!r} is listed twice",
                "keep one [[slices.vm_types]] entry",
                ("vm_types",),
            )
        known = set(names)
        for field, used in [("machine_type", [self.machine_type])] + [
            (f"shapes.{i}.machine_types", s.machine_types) for i, s in enumerate(self.shapes)
        ]:
            for m in used:
                if m not in known:
                    raise data_error(
                        f"machine type {m!r} is not in slices.vm_types",
                        "add a [[slices.vm_types]] entry for it, or fix the name",
                        tuple(field.split(".")),
                    )
        tops = [s.topology for s in self.shapes]
        for i, s in enumerate(self.shapes):
            dims = axes_of(s.topology)
            where = ("shapes", i, "topology")
            if len(dims) != self.axes:
                raise data_error(
                    f"topology {s.topology!r} has {len(dims)} axes; this generation's slices "
                    f"have {self.axes}",
                    f"write {self.axes} numbers separated by x",
                    where,
                )
            if tops.count(s.topology) > 1:
                raise data_error(f"topology {s.topology!r} is listed twice", "keep one", where)
            chips = math.prod(dims)
            if chips > self.max_chips:
                raise data_error(
                    f"topology {s.topology!r} has {chips} chips, more than slices.max_chips "
                    f"({self.max_chips})",
                    "fix the shape or max_chips",
                    where,
                )
            by_name = {v.machine_type: v for v in self.vm_types}
            for m in s.machine_types or [self.machine_type]:
                if chips % by_name[m].chips:
                    raise data_error(
                        f"topology {s.topology!r} ({chips} chips) cannot be split into VMs of "
                        f"{m} ({by_name[m].chips} chips)",
                        "name a machine type whose chip count divides the slice",
                        where,
                    )
        if self.cubes is not None and self.axes != 3:
            raise data_error(
                "[slices.cubes] needs axes = 3", "remove it or set axes = 3", ("cubes",)
            )
        return self


class Source(DataModel):
    """Where numbers come from: a URL or a repository path, and the fields it supports."""

    title: str = Field(min_length=1)
    url: str | None = Field(default=None, pattern=r"^https?://")
    repo: str | None = Field(default=None, pattern=r"^[\w.-]+/[\w.-]+$")
    path: str | None = None
    commit: str | None = Field(default=None, pattern=r"^[0-9a-f]{7,40}$")
    fields: list[str] = Field(min_length=1)
    note: str = ""

    @model_validator(mode="after")
    def _traceable(self) -> Source:
        if not self.url and not (self.repo and self.path):
            raise data_error(
                "a source needs a url, or a repo and a path",
                'add url = "https://...", or repo = "owner/name" and path = "file/in/repo"',
            )
        return self


def _slice_figures(slices: Slices) -> list[str]:
    """Every figure of [slices] that is set, by the name a source lists it under."""
    out = [
        f"slices.{name}"
        for name, value in slices
        if value is not None and name not in ("vm_types", "axes")
    ]
    for vm in slices.vm_types:
        out += [
            f"slices.vm_types.{vm.machine_type}.{name}"
            for name, value in vm
            if value is not None and name != "machine_type"
        ]
    return out


def _covered(field: str, covered: set[str]) -> bool:
    """``slices.vm_types.X.vcpus`` is covered by itself or by any table above it."""
    parts = field.split(".")
    return any(".".join(parts[:n]) in covered for n in range(2, len(parts) + 1))


class Generation(DataModel):
    schema_version: int
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=32)
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    generation: Annotated[int, Field(ge=1, le=99)]
    provisional: bool = False
    release_year: Annotated[int, Field(ge=2015, le=2100)]
    replaces: str | None = None
    notes: str = ""
    chip: Chip
    identify: Identify
    kernels: Kernels = Field(default_factory=Kernels)
    slices: Slices | None = None
    sources: list[Source] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return printable_name(v)

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        return identifiers_list(v, "alias")

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise data_error(
                f"schema_version {v} is newer than this tpu-registry understands "
                f"({SCHEMA_VERSION})",
                "upgrade tpu-registry to read this file",
            )
        if v < 1:
            raise data_error(
                "schema_version must be 1 or more", f"write schema_version = {SCHEMA_VERSION}"
            )
        return v

    @field_validator("sources")
    @classmethod
    def _every_number_sourced(cls, sources: list[Source], info: ValidationInfo) -> list[Source]:
        covered = {f for s in sources for f in s.fields}
        unknown = sorted(
            f for f in covered if f.startswith("chip.") and f[5:] not in Chip.model_fields
        )
        if unknown:
            raise data_error(
                f"sources name unknown chip fields: {', '.join(unknown)}",
                "use the field names of [chip]; `tpu-registry schema` lists them",
            )
        chip = info.data.get("chip")
        if chip is not None:
            missing = [
                f"chip.{name}"
                for name, value in chip
                if value is not None and f"chip.{name}" not in covered
            ]
            if missing:
                raise data_error(
                    f"no source covers {', '.join(missing)}",
                    "add each field to the `fields` list of the [[sources]] entry it comes from",
                )
        slices = info.data.get("slices")
        if slices is not None:
            missing = [f for f in _slice_figures(slices) if not _covered(f, covered)]
            if missing:
                raise data_error(
                    f"no source covers {', '.join(missing)}",
                    "add each field (or its table, such as slices.vm_types.NAME) to the `fields` "
                    "list of the [[sources]] entry it comes from",
                )
        return sources

    @model_validator(mode="after")
    def _slices_fit_the_chip(self) -> Generation:
        s = self.slices
        if s is None:
            return self
        if self.chip.max_pod_chips and s.max_chips > self.chip.max_pod_chips:
            raise data_error(
                f"slices.max_chips ({s.max_chips}) exceeds chip.max_pod_chips "
                f"({self.chip.max_pod_chips}): a slice cannot be larger than its pod",
                "check both counts",
                ("slices", "max_chips"),
            )
        return self

    @model_validator(mode="after")
    def _published_unless_provisional(self) -> Generation:
        if not self.provisional:
            unset = [
                f
                for f in ("topology", "max_pod_chips", "chips_per_host")
                if getattr(self.chip, f) is None
            ]
            if unset:
                raise data_error(
                    f"chip.{unset[0]} is required unless the generation is marked provisional",
                    f"set chip.{unset[0]}, or write provisional = true while it is unpublished",
                    ("chip", unset[0]),
                )
        return self
