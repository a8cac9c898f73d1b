"""Upstream kernel rules in one place: the formulas vLLM, tpu-inference and torch_xla use to
choose page sizes and block sizes, and the checks their kernels make before they run.

Every function takes catalog facts as arguments (SMEM and VMEM bytes, lanes, the
``[kernels.*]`` numbers of a generation file) instead of switching on a TPU version. The
baseline policy, the tables policy, the constraint checks and the attention plan all call
these; nothing else restates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import Problem, TuningError
from .types import Violation
from .units import align, cdiv, itemsize, mib_to_bytes, next_pow2, packing

if TYPE_CHECKING:
    from .spec import Generation, RpaV2Facts, RpaV3Facts
    from .workload import Workload

# --------------------------------------------------------------------------- page size
# vLLM's rule (``PallasAttentionBackend.get_page_size``, vLLM <= 0.13; tpu-inference's
# ``flash_attn.py`` since): aim for 16 pages per sequence (scalar registers spill with more),
# within [16, 256]; past 8192 tokens use 16 (a VMEM-OOM workaround upstream).
PAGES_PER_SEQ_TARGET = 16
MIN_PAGE, MAX_PAGE = 16, 256
LONG_CONTEXT = 8192
# ``get_min_page_size``: block tables take 4 bytes per page and may use half of SMEM.
BLOCK_TABLE_ENTRY_BYTES = 4
SMEM_SHARE = 2
# tpu-inference pads head dims to the lane width (``TPU_HEAD_SIZE_ALIGNMENT``).
HEAD_ALIGNMENT = 128


def page_size_for(max_model_len: int) -> int:
    """vLLM's ``get_page_size``, before the SMEM floor."""
    if max_model_len > LONG_CONTEXT:
        return MIN_PAGE
    return min(max(next_pow2(max_model_len) // PAGES_PER_SEQ_TARGET, MIN_PAGE), MAX_PAGE)


def max_pages_per_seq(smem_bytes: int, max_num_seqs: int) -> int:
    return smem_bytes // SMEM_SHARE // max_num_seqs // BLOCK_TABLE_ENTRY_BYTES


def min_page_size(
    smem_bytes: int, max_model_len: int, max_num_seqs: int, *, where: str = ""
) -> int:
    """vLLM's ``get_min_page_size``: the smallest page whose block tables fit half of SMEM."""
    per_req = max_pages_per_seq(smem_bytes, max_num_seqs)
    if per_req == 0:
        limit = smem_bytes // SMEM_SHARE // BLOCK_TABLE_ENTRY_BYTES
        on = f" on {where}" if where else ""
        msg = f"{max_num_seqs} sequences leave no SMEM for block tables{on} (at most {limit})"
        raise TuningError([Problem("workload", None, "max_num_seqs", msg, "lower max_num_seqs")])
    return next_pow2(cdiv(max_model_len, per_req))


def default_page_size(smem_bytes: int, w: Workload, *, where: str = "") -> int:
    """The page size upstream uses: the user's (``--block-size``), else the formula raised to
    the SMEM floor (tpu-inference's platform: "Increase the page size ... to avoid SMEM OOM")."""
    if w.page_size is not None:
        return w.page_size
    floor = min_page_size(smem_bytes, w.max_model_len, w.max_num_seqs, where=where)
    return max(page_size_for(w.max_model_len), floor)


def max_num_seqs_for(smem_bytes: int, max_model_len: int, page: int) -> int:
    """vLLM's ``get_max_num_seqs``: sequences whose block tables fit half of SMEM."""
    return smem_bytes // SMEM_SHARE // cdiv(max_model_len, page) // BLOCK_TABLE_ENTRY_BYTES


def padded_head_dim(head_dim: int, lanes: int = HEAD_ALIGNMENT) -> int:
    """Head dim padded to the lane width, never further (the seed's padding to 256 doubled
    the KV cache)."""
    return align(head_dim, lanes)


# --------------------------------------------------------------------------- RPA v2
# torch_xla's ``ragged_paged_attention`` (``custom_kernel.py``) and its Pallas kernel
# (``ragged_paged_attention_v2.py``).


def min_heads_per_block(
    num_q_heads: int, num_combined_kv: int, q_dtype: str, kv_dtype: str
) -> tuple[int, int] | None:
    """The v2 kernel's ``get_min_heads_per_blk`` (None: the KV heads cannot be tiled)."""
    q_pack, kv_pack = packing(q_dtype), packing(kv_dtype)

    def tiles(x: int, pack: int) -> bool:
        return x % pack == 0 and (x // pack in (1, 2, 4, 8) or (x // pack) % 8 == 0)

    if not tiles(num_combined_kv, kv_pack):
        return None
    ratio = num_q_heads // (num_combined_kv // 2)
    tiling = 8 * kv_pack
    min_kv = tiling if num_combined_kv % tiling == 0 else num_combined_kv
    min_q = min_kv // 2 * ratio
    if tiles(min_q, q_pack):
        return min_q, min_kv
    return num_q_heads, num_combined_kv


def rpa_v2_block_bytes(
    bkv: int,
    bq: int,
    q_heads_blk: int,
    kv_heads_blk: int,
    head_dim: int,
    page: int,
    q_dtype: str,
    kv_dtype: str,
) -> int:
    """VMEM the v2 blocks take: double-buffered q in/out, KV, and f32 scratch."""
    q_block = bq * q_heads_blk * head_dim * itemsize(q_dtype)
    kv_block = 2 * bkv * page * 2 * kv_heads_blk * head_dim * itemsize(kv_dtype)
    lm = kv_heads_blk * bq * 2 * (q_heads_blk // kv_heads_blk) * 128 * 4
    acc = bq * q_heads_blk * head_dim * 4
    return 2 * (q_block + q_block) + kv_block + 2 * lm + acc


def rpa_v2_defaults(
    facts: RpaV2Facts, lanes: int, vmem_core_bytes: int, w: Workload, page: int
) -> dict[str, int] | str:
    """torch_xla's defaults: the catalog's blocks, KV block halved while the blocks would take
    the catalog's VMEM threshold or more, clamped per sequence and batch (``min(pages_per_seq,
    bkv)``, ``min(num_tokens, bq)``); VMEM as torch_xla passes it, capped at the core.
    A string says why the kernel cannot run this shape."""
    head_dim = padded_head_dim(w.head_dim, lanes)
    heads = min_heads_per_block(
        w.q_heads_per_device, 2 * w.kv_heads_per_device, w.q_dtype, w.kv_dtype
    )
    if heads is None:
        return (
            f"rpa_v2: {2 * w.kv_heads_per_device} combined KV heads cannot be tiled for "
            f"{w.kv_dtype}"
        )
    q_blk, kv_blk = heads[0], heads[1] // 2
    bkv, bq = facts.default_num_kv_pages_per_block, facts.default_num_queries_per_block
    if facts.halve_kv_block_at_vmem_mib is not None:
        threshold = mib_to_bytes(facts.halve_kv_block_at_vmem_mib)
        while (
            bkv > 1
            and rpa_v2_block_bytes(bkv, bq, q_blk, kv_blk, head_dim, page, w.q_dtype, w.kv_dtype)
            >= threshold
        ):
            bkv //= 2
    return {
        "rpa_v2.num_kv_pages_per_block": min(cdiv(w.max_model_len, page), max(bkv, 1)),
        "rpa_v2.num_queries_per_block": min(w.max_num_batched_tokens, bq),
        "rpa_v2.vmem_limit_bytes": min(mib_to_bytes(facts.vmem_limit_mib), vmem_core_bytes),
    }


# --------------------------------------------------------------------------- RPA v3
# tpu-inference's ``ragged_paged_attention`` v3 (``kernels/ragged_paged_attention/v3/kernel.py``).

RPA_V3_CASES = {
    "decode": "rpa_v3.d_block_sizes",
    "prefill": "rpa_v3.p_block_sizes",
    "mixed": "rpa_v3.m_block_sizes",
}


def rpa_v3_block_sizes(
    facts: RpaV3Facts, w: Workload, page: int, case: str
) -> tuple[int, int, int, int]:
    """``get_default_block_sizes``: (bq_sz, bkv_sz, bq_csz, bkv_csz) for one case, computed
    from the heads of one shard and the padded token count (``max_num_batched_tokens``)."""
    kv_pack = packing(w.kv_dtype)
    kv_heads_x2 = next_pow2(align(w.kv_heads_per_device * 2, kv_pack))
    head_dim = align(w.head_dim, HEAD_ALIGNMENT)
    q_per_kv = next_pow2(w.q_heads_per_device // w.kv_heads_per_device)
    max_q = next_pow2(w.max_num_batched_tokens)
    max_kv = cdiv(w.max_model_len, page) * page
    if case == "decode":
        bkv = min(facts.decode_kv_bytes * kv_pack // 4 // head_dim // kv_heads_x2, max_kv)
        bq_sz, bkv_sz, bq_csz, bkv_csz = 1, bkv, 1, bkv
    else:
        bq_sz = min(facts.prefill_q_budget // q_per_kv, max_q // facts.prefill_q_max_divisor)
        bkv_sz = min(facts.prefill_kv_tokens, max_kv // facts.prefill_kv_max_divisor)
        bq_csz = min(facts.chunk_q_budget // q_per_kv, max_q // facts.chunk_q_max_divisor)
        bkv_csz = min(facts.chunk_kv_tokens, align(max_kv // 2, page))
    return max(1, bq_sz), align(bkv_sz, page), max(1, bq_csz), align(bkv_csz, page)


def rpa_v3_defaults(
    facts: RpaV3Facts, vmem_core_bytes: int, w: Workload, page: int
) -> dict[str, Any]:
    """Block sizes for each case and the VMEM limit (the whole core unless the catalog says)."""
    vmem = (
        vmem_core_bytes
        if facts.vmem_limit_mib is None
        else min(mib_to_bytes(facts.vmem_limit_mib), vmem_core_bytes)
    )
    out: dict[str, Any] = {
        knob: rpa_v3_block_sizes(facts, w, page, case) for case, knob in RPA_V3_CASES.items()
    }
    out["rpa_v3.vmem_limit_bytes"] = vmem
    return out


def rpa_v3_rejection(block_sizes: tuple[int, int, int, int], page_size: int) -> str | None:
    """Why the v3 kernel would reject this tuple as an explicit argument (None: it accepts it).
    The kernel checks explicit tuples only; its own per-call defaults, which the baseline
    reproduces, can fail the check, and are then best left to the kernel."""
    bq, bkv, bq_c, bkv_c = block_sizes
    if not (0 < bq_c and bq % bq_c == 0):
        return f"bq_sz {bq} is not a multiple of bq_csz {bq_c}"
    if not (0 < bkv_c and bkv % bkv_c == 0):
        return f"bkv_sz {bkv} is not a multiple of bkv_csz {bkv_c}"
    if bkv % page_size or bkv_c % page_size:
        return f"KV blocks {bkv}/{bkv_c} are not multiples of page size {page_size}"
    return None


# --------------------------------------------------------------------------- constraints

VMEM_KNOBS = ("vmem_limit_bytes", "rpa_v2.vmem_limit_bytes", "rpa_v3.vmem_limit_bytes")
FAMILY_VMEM_KNOBS = ("rpa_v2.vmem_limit_bytes", "rpa_v3.vmem_limit_bytes")


def check(spec: Generation, w: Workload, knobs: Mapping[str, Any]) -> list[Violation]:
    """Every rule a final set of knobs must satisfy, as structured violations."""
    out: list[Violation] = []
    vmem = spec.chip.vmem_bytes_per_core
    page = knobs.get("page_size")
    if page is not None and (page <= 0 or page & (page - 1)):
        out.append(
            Violation(
                "page_power_of_two",
                ("page_size",),
                f"page_size {page} is not a positive power of two",
            )
        )
        page = None
    for name in VMEM_KNOBS:
        v = knobs.get(name)
        if v is not None and not 0 < v <= vmem:
            mib = spec.chip.vmem_mib_per_core
            where = (
                "not positive"
                if v <= 0
                else f"above the {spec.id} core VMEM of {vmem} bytes ({mib:g} MiB)"
            )
            out.append(Violation("vmem_within_core", (name,), f"{name} {v} is {where}"))
    ceiling = knobs.get("vmem_limit_bytes")
    for name in FAMILY_VMEM_KNOBS:
        v = knobs.get(name)
        if v is not None and ceiling is not None and ceiling < v <= vmem:
            out.append(
                Violation(
                    "vmem_within_ceiling",
                    (name, "vmem_limit_bytes"),
                    f"{name} {v} is above vmem_limit_bytes {ceiling}",
                )
            )
    hd = knobs.get("head_dim_padded")
    if hd is not None and (hd < w.head_dim or hd % spec.chip.lanes):
        msg = (
            f"head_dim_padded {hd} must be at least head_dim {w.head_dim} and a multiple of "
            f"{spec.chip.lanes} lanes"
        )
        out.append(Violation("head_padding", ("head_dim_padded",), msg))
    if page:
        pages_per_seq = cdiv(w.max_model_len, page)
        bkv = knobs.get("rpa_v2.num_kv_pages_per_block")
        bq = knobs.get("rpa_v2.num_queries_per_block")
        if bkv is not None and not 0 < bkv <= pages_per_seq:
            msg = (
                f"rpa_v2.num_kv_pages_per_block {bkv} must be in 1..{pages_per_seq} (pages per "
                "sequence)"
            )
            out.append(Violation("rpa_v2_kv_block", ("rpa_v2.num_kv_pages_per_block",), msg))
        if bq is not None and not 0 < bq <= w.max_num_batched_tokens:
            msg = (
                f"rpa_v2.num_queries_per_block {bq} must be in 1..{w.max_num_batched_tokens} (max "
                "batched tokens)"
            )
            out.append(Violation("rpa_v2_q_block", ("rpa_v2.num_queries_per_block",), msg))
        max_kv = pages_per_seq * page
        max_q = next_pow2(w.max_num_batched_tokens)
        for name in RPA_V3_CASES.values():
            t = knobs.get(name)
            if t is None:
                continue
            bq_sz, bkv_sz, bq_csz, bkv_csz = t
            if min(t) <= 0:
                out.append(Violation("rpa_v3_positive", (name,), f"{name} {t} must be positive"))
                continue
            if bkv_sz % page or bkv_csz % page:
                msg = f"{name} {t}: KV block sizes must be multiples of page_size {page}"
                out.append(Violation("rpa_v3_kv_page_multiple", (name, "page_size"), msg))
            if bkv_sz > align(max_kv, page) or bkv_csz > bkv_sz:
                msg = (
                    f"{name} {t}: KV blocks must satisfy bkv_csz <= bkv_sz <= {max_kv} (tokens "
                    "per sequence)"
                )
                out.append(Violation("rpa_v3_kv_block_bounds", (name,), msg))
            if max(bq_sz, bq_csz) > max_q:
                msg = f"{name} {t}: query blocks must be within {max_q} batched tokens"
                out.append(Violation("rpa_v3_q_block_bounds", (name,), msg))
    return out
