"""The knob registry: every knob a layer may set, its type, its range and what it means.

Knob names are flat and namespaced by kernel family (``page_size``,
``rpa_v2.num_kv_pages_per_block``, ``rpa_v3.d_block_sizes``). ``coerce`` is the one check of a
value on its own (type, sign, absolute bounds, the block-size divisibility the RPA v3 kernel
asserts for explicit tuples), used alike for overrides files (``validate`` and ``resolve``),
plugin layers, the JSON Schema and the docs. Rules that need the generation and the workload
are in ``kernels.check``.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any

# Absolute bounds, far above any real value: a value beyond them is a slip (a byte count in a
# token field, an exponent typo), refused before anything else is known.
MAX_TOKENS = 1 << 24  # tokens per block or page
MAX_PAGES = 1 << 20
MAX_VMEM_BYTES = 1 << 34  # 16 GiB; any core's VMEM is far below
MAX_PAGE_SIZE = 1 << 16


@dataclass(frozen=True)
class KnobSpec:
    name: str
    kind: str  # "int" | "blocks": 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz)
    doc: str
    _: KW_ONLY
    unit: str = ""
    maximum: int = MAX_TOKENS
    settable: bool = True  # False: derived from other knobs and the workload, never set
    power_of_two: bool = False


_BLOCKS = "(bq_sz, bkv_sz, bq_csz, bkv_csz): query and KV tokens per block and per compute chunk"
REGISTRY: dict[str, KnobSpec] = {
    k.name: k
    for k in (
        KnobSpec(
            "head_dim_padded",
            "int",
            "head dim as the KV cache stores it",
            unit="lanes",
            maximum=4096,
        ),
        KnobSpec(
            "page_size",
            "int",
            "tokens per KV-cache page (vLLM's block size)",
            unit="tokens",
            maximum=MAX_PAGE_SIZE,
            power_of_two=True,
        ),
        KnobSpec(
            "min_page_size",
            "int",
            "smallest page whose block tables fit half of SMEM",
            unit="tokens",
            settable=False,
        ),
        KnobSpec(
            "max_num_seqs_smem",
            "int",
            "sequences whose block tables fit half of SMEM at this page size",
            settable=False,
            maximum=1 << 40,
        ),
        KnobSpec(
            "vmem_limit_bytes",
            "int",
            "VMEM ceiling for every attention kernel",
            unit="bytes",
            maximum=MAX_VMEM_BYTES,
        ),
        KnobSpec(
            "rpa_v2.num_kv_pages_per_block",
            "int",
            "KV pages per block of the RPA v2 kernel",
            unit="pages",
            maximum=MAX_PAGES,
        ),
        KnobSpec(
            "rpa_v2.num_queries_per_block",
            "int",
            "query tokens per block of the RPA v2 kernel",
            unit="tokens",
        ),
        KnobSpec(
            "rpa_v2.vmem_limit_bytes",
            "int",
            "VMEM limit passed to the RPA v2 kernel",
            unit="bytes",
            maximum=MAX_VMEM_BYTES,
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
            "rpa_v3.vmem_limit_bytes",
            "int",
            "VMEM limit passed to the RPA v3 kernel",
            unit="bytes",
            maximum=MAX_VMEM_BYTES,
        ),
        KnobSpec(
            "rpa_v3_hd64.num_kv_pages_per_block",
            "int",
            "KV pages per block of the head-dim-64 RPA v3 kernel",
            unit="pages",
            maximum=MAX_PAGES,
        ),
        KnobSpec(
            "rpa_v3_hd64.num_queries_per_block",
            "int",
            "query tokens per block of the head-dim-64 RPA v3 kernel",
            unit="tokens",
        ),
        KnobSpec(
            "rpa_v3_hd64.vmem_limit_bytes",
            "int",
            "VMEM limit passed to the head-dim-64 RPA v3 kernel",
            unit="bytes",
            maximum=MAX_VMEM_BYTES,
        ),
        *(
            KnobSpec(
                f"mla_v2.{case}_{name}",
                "int",
                f"{what} of the MLA v2 kernel's {case} case" + extra,
                unit=unit,
                maximum=maximum,
            )
            for case, extra in (
                ("decode", " (decode-only and batched-decode sequences)"),
                ("prefill", " (chunked prefill, when chunk_prefill_size is set)"),
                ("mixed", ""),
            )
            for name, what, unit, maximum in (
                ("kv_pages_per_block", "KV pages per block", "pages", MAX_PAGES),
                ("queries_per_block", "query tokens per block", "tokens", MAX_TOKENS),
            )
        ),
        KnobSpec(
            "mla_v2.decode_batch_size",
            "int",
            "decode sequences the MLA v2 kernel processes per grid step",
            unit="sequences",
        ),
        KnobSpec(
            "mla_v2.mixed_q_split",
            "int",
            "query splits the MLA v2 kernel runs in parallel in the mixed case",
        ),
        KnobSpec(
            "mla_v2.vmem_limit_bytes",
            "int",
            "VMEM limit passed to the MLA v2 kernel",
            unit="bytes",
            maximum=MAX_VMEM_BYTES,
        ),
    )
}
SETTABLE = tuple(k for k, s in REGISTRY.items() if s.settable)


class KnobError(ValueError):
    """A knob name or value is wrong; ``hint`` says how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def suggest(name: str) -> str:
    """``did you mean 'rpa_v3.d_block_sizes'`` (or the list of knobs)."""
    import difflib  # only to suggest a name for a misspelt one

    close = difflib.get_close_matches(name, SETTABLE, n=1, cutoff=0.6)
    if not close and "." in name:  # right knob, wrong family, or the other way round
        tail = name.split(".", 1)[1]
        close = [k for k in SETTABLE if k.endswith("." + tail)][:1]
    if close:
        return f"did you mean {close[0]!r}?"
    return "knobs: " + ", ".join(SETTABLE)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def coerce(name: str, value: Any) -> Any:
    """The value of knob ``name`` in its canonical form (tuples for block sizes); raises
    ``KnobError`` for an unknown or derived knob, or a value of the wrong type or range."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise KnobError(f"unknown knob {name!r}", suggest(name))
    if not spec.settable:
        raise KnobError(
            f"{name} is derived, not set", "set page_size (and the workload's limits) instead"
        )
    if spec.kind == "int":
        if not _whole(value):
            raise KnobError(f"{name} must be a whole number, got {value!r}", _type_hint(value))
        if not 0 < value <= spec.maximum:
            msg = f"{name} {value} is out of range 1..{spec.maximum} [rule knob_range]"
            raise KnobError(msg, "check the value and its unit")
        if spec.power_of_two and value & (value - 1):
            msg = f"{name} {value} is not a power of two [rule page_power_of_two]"
            raise KnobError(msg, "use 16, 32, 64, 128 or 256")
        return value
    if not isinstance(value, (list, tuple)):
        raise KnobError(
            f"{name} must be 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz), got {value!r}",
            "write an array: [bq_sz, bkv_sz, bq_csz, bkv_csz]",
        )
    if len(value) != 4 or not all(_whole(v) for v in value):
        raise KnobError(
            f"{name} must be 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz), got {list(value)!r}",
            "write an array of 4 whole numbers",
        )
    t = tuple(value)
    if not all(0 < v <= spec.maximum for v in t):
        msg = f"{name} {list(t)} must be 4 numbers in 1..{spec.maximum} [rule knob_range]"
        raise KnobError(msg, "block sizes count tokens")
    bq, bkv, bq_c, bkv_c = t
    # tpu-inference v3 kernel.py, static_validate_inputs._validate_block_sizes
    if bq % bq_c:
        raise KnobError(
            f"{name} {list(t)}: bq_sz {bq} is not a multiple of bq_csz {bq_c} "
            "[rule rpa_v3_block_divisibility]",
            "the kernel's static_validate_inputs requires bq_sz % bq_csz == 0",
        )
    if bkv % bkv_c:
        raise KnobError(
            f"{name} {list(t)}: bkv_sz {bkv} is not a multiple of bkv_csz {bkv_c} "
            "[rule rpa_v3_block_divisibility]",
            "the kernel's static_validate_inputs requires bkv_sz % bkv_csz == 0",
        )
    return t


def out_of_range(name: str, value: Any) -> bool:
    """Whether a settable knob's value lies above its absolute range (values below 1 are the
    kernel rules' to name)."""
    spec = REGISTRY.get(name)
    if spec is None or not spec.settable:
        return False
    values = value if isinstance(value, tuple) else (value,)
    return any(_whole(v) and v > spec.maximum for v in values)


def _type_hint(value: Any) -> str:
    if isinstance(value, bool):
        return "write a number, not true or false"
    if isinstance(value, str):
        return "write the number without quotes"
    return "write a whole number"


def json_schema() -> dict[str, Any]:
    """JSON Schema of a table of knobs (the ``knobs`` of an overrides entry)."""
    props: dict[str, Any] = {}
    for k in SETTABLE:
        s = REGISTRY[k]
        if s.kind == "int":
            props[k] = {"type": "integer", "minimum": 1, "maximum": s.maximum, "description": s.doc}
        else:
            item = {"type": "integer", "minimum": 1, "maximum": s.maximum}
            props[k] = {
                "type": "array",
                "items": item,
                "minItems": 4,
                "maxItems": 4,
                "description": s.doc,
            }
    return {
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "minProperties": 1,
    }
