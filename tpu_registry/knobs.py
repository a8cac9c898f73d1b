"""The knob registry: every knob a layer may set, its type and what it means.

Knob names are flat and namespaced by kernel family (``page_size``,
``rpa_v2.num_kv_pages_per_block``, ``rpa_v3.d_block_sizes``); a kernel family is a namespace.
``coerce`` is the one check of a value's shape, used for overrides files, plugin layers,
``validate`` and the JSON Schema alike.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any


@dataclass(frozen=True)
class KnobSpec:
    name: str
    kind: str  # "int": a whole number; "blocks": 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz)
    doc: str
    _: KW_ONLY
    unit: str = ""

    @property
    def family(self) -> str | None:
        return self.name.split(".", 1)[0] if "." in self.name else None


_BLOCKS = "(bq_sz, bkv_sz, bq_csz, bkv_csz): query and KV tokens per block, and per compute chunk"
REGISTRY: dict[str, KnobSpec] = {
    k.name: k
    for k in (
        KnobSpec(
            "head_dim_padded",
            "int",
            "head dim as the KV cache stores it (the lane width's multiple)",
        ),
        KnobSpec("page_size", "int", "tokens per KV-cache page (vLLM's block size)", unit="tokens"),
        KnobSpec(
            "min_page_size",
            "int",
            "smallest page whose block tables fit half of SMEM",
            unit="tokens",
        ),
        KnobSpec(
            "max_num_seqs_smem",
            "int",
            "sequences whose block tables fit half of SMEM at this page size",
        ),
        KnobSpec(
            "vmem_limit_bytes", "int", "VMEM ceiling for every attention kernel", unit="bytes"
        ),
        KnobSpec(
            "rpa_v2.num_kv_pages_per_block",
            "int",
            "KV pages per block of the RPA v2 kernel",
            unit="pages",
        ),
        KnobSpec(
            "rpa_v2.num_queries_per_block",
            "int",
            "query tokens per block of the RPA v2 kernel",
            unit="tokens",
        ),
        KnobSpec(
            "rpa_v2.vmem_limit_bytes", "int", "VMEM limit passed to the RPA v2 kernel", unit="bytes"
        ),
        KnobSpec(
            "rpa_v3.d_block_sizes", "blocks", "RPA v3 block sizes of decode-only batches " + _BLOCKS
        ),
        KnobSpec(
            "rpa_v3.p_block_sizes",
            "blocks",
            "RPA v3 block sizes of prefill-only batches " + _BLOCKS,
        ),
        KnobSpec(
            "rpa_v3.m_block_sizes", "blocks", "RPA v3 block sizes of mixed batches " + _BLOCKS
        ),
        KnobSpec(
            "rpa_v3.vmem_limit_bytes", "int", "VMEM limit passed to the RPA v3 kernel", unit="bytes"
        ),
    )
}
COMMON_KNOBS = tuple(k for k in REGISTRY if "." not in k)
BLOCK_KNOBS = tuple(k for k, s in REGISTRY.items() if s.kind == "blocks")


def coerce(name: str, value: Any) -> Any:
    """Normalise one knob value; raise ValueError with the reason when it has the wrong shape."""
    spec = REGISTRY.get(name)
    if spec is None:
        if "." not in name:
            common = ", ".join(COMMON_KNOBS)
            raise ValueError(
                f"unknown knob {name!r} (common knobs: {common}; kernel knobs are 'family.name')"
            )
        return value
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return value
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",")]
    try:
        # Whole numbers only: 1.5 must be an error, not silently 1.
        items = tuple(
            v if isinstance(v, int) and not isinstance(v, bool) else int(str(v).strip())
            for v in value
        )
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"{name} must be 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz), got {value!r}"
        ) from None
    if len(items) != 4:
        raise ValueError(
            f"{name} must be 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz), got {len(items)}"
        )
    return items
