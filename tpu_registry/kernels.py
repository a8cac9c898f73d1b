"""Upstream kernel rules in one place: the formulas vLLM, tpu-inference and torch_xla use to
choose page sizes and block sizes, and the checks their kernels make before they run.

Every function takes catalog facts as arguments (SMEM and VMEM bytes, lanes, the
``[kernels.*]`` numbers of a generation file) instead of switching on a TPU version. The
baseline policy, the tables policy, the constraint checks and the attention plan all call
these; nothing else restates them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import knobs as knob_registry
from .errors import Problem, TuningError
from .types import Violation
from .units import align, cdiv, itemsize, mib_to_bytes, next_pow2, packing

if TYPE_CHECKING:
    from .spec import Generation, MlaV2Facts, RpaV2Facts, RpaV3Facts, RpaV3Hd64Facts
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


def min_page_size(smem_bytes: int, max_model_len: int, max_num_seqs: int, *, where: str) -> int:
    """vLLM's ``get_min_page_size``: the smallest page whose block tables fit half of SMEM
    (``where``: the generation, for the message)."""
    per_req = max_pages_per_seq(smem_bytes, max_num_seqs)
    if per_req == 0:
        limit = smem_bytes // SMEM_SHARE // BLOCK_TABLE_ENTRY_BYTES
        msg = (
            f"{max_num_seqs} sequences leave no SMEM for block tables on {where} (at most {limit})"
        )
        raise TuningError([Problem("workload", None, "max_num_seqs", msg, "lower max_num_seqs")])
    return next_pow2(cdiv(max_model_len, per_req))


def default_page_size(smem_bytes: int, w: Workload, *, where: str) -> int:
    """The page size upstream uses: the user's (``--block-size``), else the formula raised to
    the SMEM floor (tpu-inference's platform: "Increase the page size ... to avoid SMEM OOM")."""
    if w.page_size is not None:
        return w.page_size
    floor = min_page_size(smem_bytes, w.max_model_len, w.max_num_seqs, where=where)
    return max(page_size_for(w.max_model_len), floor)


def page_size_of(spec: Generation, w: Workload) -> int:
    """The page size upstream gives this workload on this generation: MLA models get the MLA
    backend's page (``PallasMLAttentionBackend.get_page_size``), raised to the SMEM floor the
    registry holds every page to; every other model ``default_page_size``."""
    smem = spec.chip.smem_bytes_per_core
    if w.is_mla and "mla_v2" in spec.kernels.families and w.page_size is None:
        floor = min_page_size(smem, w.max_model_len, w.max_num_seqs, where=spec.id)
        return max(spec.kernels.mla_v2.page_size, floor)
    return default_page_size(smem, w, where=spec.id)


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
        "rpa_v2.num_queries_per_block": min(w.tokens, bq),
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
    from the heads of one shard and the padded token count of the call (``w.tokens``)."""
    kv_pack = packing(w.kv_dtype)
    kv_heads_x2 = next_pow2(align(w.kv_heads_per_device * 2, kv_pack))
    head_dim = align(w.head_dim, HEAD_ALIGNMENT)
    q_per_kv = next_pow2(w.q_heads_per_device // w.kv_heads_per_device)
    max_q = next_pow2(w.tokens)  # the padded token count of the call (max_num_tokens upstream)
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
) -> tuple[dict[str, Any], list[str]]:
    """Block sizes for each case and the VMEM limit (the whole core unless the catalog says),
    and notes. Upstream's formulas can ask for more VMEM than the limit (large head dims,
    f32 queries, pages forced large by SMEM): such a tuple is shrunk until it fits, and
    when even one page of KV cannot fit, the workload is refused."""
    vmem = vmem_core_bytes
    if facts.vmem_limit_mib is not None:
        vmem = min(mib_to_bytes(facts.vmem_limit_mib), vmem_core_bytes)
    out: dict[str, Any] = {}
    notes = []
    for case, knob in RPA_V3_CASES.items():
        t = rpa_v3_block_sizes(facts, w, page, case)
        fitted = rpa_v3_fit_vmem(w, t, page, vmem)
        if fitted is None:
            need = rpa_v3_vmem_bytes(w, 1, page)
            msg = (
                f"the RPA v3 kernel needs {need} bytes of VMEM for one page of {page} tokens, "
                f"above the {vmem}-byte limit [rule rpa_v3_vmem_estimate]"
            )
            hint = "lower max_num_seqs or max_model_len so that a smaller page fits SMEM"
            raise TuningError([Problem("workload", None, "page_size", msg, hint)])
        if fitted != t:
            need = rpa_v3_vmem_bytes(w, t[0], t[1])
            notes.append(
                f"{knob} {fitted} instead of upstream's {t}, which needs {need} bytes of VMEM "
                f"(limit {vmem})"
            )
        out[knob] = fitted
    out["rpa_v3.vmem_limit_bytes"] = vmem
    return out, notes


def rpa_v3_fit_vmem(
    w: Workload, t: tuple[int, int, int, int], page: int, limit: int
) -> tuple[int, int, int, int] | None:
    """``t`` if its VMEM estimate is within ``limit``; else a tuple shrunk until it is (query
    block first, then KV block, in whole pages), valid as an explicit kernel argument; None
    when not even one query and one page fit."""
    bq, bkv, bq_c, bkv_c = t
    if rpa_v3_vmem_bytes(w, bq, bkv) <= limit:
        return t
    while rpa_v3_vmem_bytes(w, bq, bkv) > limit:
        if bq > 1:
            bq //= 2
        elif bkv > page:
            bkv = max(page, align(bkv // 2, page))
        else:
            return None
    bq_c = math.gcd(bq, min(bq_c, bq))
    bkv_c = page * math.gcd(bkv // page, max(1, min(bkv_c, bkv) // page))
    return bq, bkv, bq_c, bkv_c


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


# --------------------------------------------------------------------------- dispatch
# Which kernel runs a layer, as upstream dispatches it: tpu-inference's
# ``sharded_ragged_paged_attention`` takes the hd64 kernel when ``q.shape[-1] == 64`` (and only
# it takes sinks); MLA layers always run ``FLASH_ATTN_MLA`` (``TpuPlatform.get_attn_backend_cls``);
# torch_xla's RPA v2 (vLLM <= 0.13) takes any head dim but neither sinks nor MLA.


def families_for(spec: Generation, w: Workload) -> tuple[str, ...]:
    """The kernel families of ``spec`` that run this workload's attention."""
    if w.is_mla:
        wanted: tuple[str, ...] = ("mla_v2",)
    elif w.attention_sinks:
        wanted = ("rpa_v3_hd64",)
    elif w.head_dim == 64:
        wanted = ("rpa_v2", "rpa_v3_hd64")
    else:
        wanted = ("rpa_v2", "rpa_v3")
    return tuple(f for f in spec.kernels.families if f in wanted)


# --------------------------------------------------------------------------- RPA v3, head dim 64
# tpu-inference's ``kernel_hd64.py`` and ``tuned_block_sizes_hd64.py``.


def hd64_heads(w: Workload) -> tuple[int, int]:
    """``get_simplified_raw_key``'s head counts of one shard: query heads per KV head padded to
    the query packing, times the KV heads, and KV heads padded to the KV packing, each raised
    to a power of two."""
    kv = w.kv_heads_per_device
    q_per_kv = align(w.q_heads_per_device // kv, packing(w.q_dtype))
    return next_pow2(q_per_kv * kv), next_pow2(align(kv, packing(w.kv_dtype)))


def rpa_v3_hd64_vmem_bytes(w: Workload, bq: int, bkv_tokens: int) -> int:
    """hd64 ``get_vmem_estimate_bytes``: K and V share the 128 lanes of one row."""
    q_pack, kv_pack = packing(w.q_dtype), packing(w.kv_dtype)
    kv = w.kv_heads_per_device
    q_per_kv = align(w.q_heads_per_device // kv, q_pack)
    lanes = 2 * 64
    bits = (
        2 * bkv_tokens * align(kv, kv_pack) * lanes * (32 // kv_pack)
        + 2 * (2 * kv * bq * q_per_kv * lanes) * (32 // q_pack)
        + 2 * (kv * bq * q_per_kv * 128) * 32
        + kv * bq * q_per_kv * lanes * 32
    )
    return cdiv(bits, 8)


def rpa_v3_hd64_clamp(w: Workload, page: int, bkv_p: int, bq: int) -> tuple[int, int]:
    """``get_tuned_block_sizes``' per-call clamp of a looked-up pair:
    ``min(pages_per_seq, bkv_p), min(max_num_tokens, bq)``."""
    return min(cdiv(w.max_model_len, page), bkv_p), min(w.tokens, bq)


def rpa_v3_hd64_fit_vmem(
    w: Workload, page: int, blocks: tuple[int, int], limit: int
) -> tuple[int, int] | None:
    """``blocks`` (KV pages, queries) if their VMEM estimate is within ``limit``, else halved
    (queries first) until it is; None when one page and one query do not fit."""
    bkv_p, bq = blocks
    while rpa_v3_hd64_vmem_bytes(w, bq, bkv_p * page) > limit:
        if bq > 1:
            bq //= 2
        elif bkv_p > 1:
            bkv_p //= 2
        else:
            return None
    return bkv_p, bq


def rpa_v3_hd64_defaults(
    facts: RpaV3Hd64Facts, vmem_core_bytes: int, w: Workload, page: int
) -> tuple[dict[str, int], list[str]]:
    """The hd64 kernel's own choice on a tuned-table miss: the per-version fallback, clamped
    per call; its default VMEM limit capped at the core. Where upstream's choice cannot run
    (no whole page in the fallback's tokens, or blocks above the VMEM limit) the registry
    gives the nearest that can, and says so."""
    notes = []
    bkv_p, bq = rpa_v3_hd64_clamp(w, page, facts.fallback_kv_tokens // page, facts.fallback_queries)
    if bkv_p < 1:
        notes.append(
            f"rpa_v3_hd64: upstream's fallback of {facts.fallback_kv_tokens} KV tokens per block "
            f"holds no page of {page} tokens (0 pages); 1 page instead"
        )
        bkv_p = 1
    limit = mib_to_bytes(facts.vmem_limit_mib)
    vmem = min(limit, vmem_core_bytes)
    if vmem < limit:
        notes.append(
            f"rpa_v3_hd64.vmem_limit_bytes {vmem} (the core's VMEM) instead of upstream's "
            f"default {limit}"
        )
    want = (bkv_p, bq)
    fitted = rpa_v3_hd64_fit_vmem(w, page, want, vmem)
    if fitted is None:
        need = rpa_v3_hd64_vmem_bytes(w, 1, page)
        msg = (
            f"the head-dim-64 RPA v3 kernel needs {need} bytes of VMEM for one page of {page} "
            f"tokens, above the {vmem}-byte limit [rule rpa_v3_hd64_vmem_estimate]"
        )
        hint = "lower max_num_seqs or max_model_len so that a smaller page fits SMEM"
        raise TuningError([Problem("workload", None, "page_size", msg, hint)])
    bkv_p, bq = fitted
    if fitted != want:
        notes.append(
            f"rpa_v3_hd64 blocks {(bkv_p, bq)} instead of upstream's {want}, which need "
            f"{rpa_v3_hd64_vmem_bytes(w, want[1], want[0] * page)} bytes of VMEM (limit {vmem})"
        )
    return {
        "rpa_v3_hd64.num_kv_pages_per_block": bkv_p,
        "rpa_v3_hd64.num_queries_per_block": bq,
        "rpa_v3_hd64.vmem_limit_bytes": vmem,
    }, notes


# --------------------------------------------------------------------------- MLA v2
# tpu-inference's ``kernels/mla/v2`` (``mla_ragged_paged_attention``, ``tuned_params``) and its
# call site ``attention_interface.mla_attention``.

MLA_CASES = ("decode", "prefill", "mixed")  # the kernel's (decode, prefill, mixed) tuples


def mla_v2_defaults(facts: MlaV2Facts, vmem_core_bytes: int) -> dict[str, int]:
    """``get_tuned_params``' fallbacks as ``mla_attention`` uses them: decode from the
    batched-decode case, prefill and mixed from the mixed case; no VMEM limit is passed, so
    the kernel takes the core's whole VMEM (``get_tpu_info().vmem_capacity_bytes``)."""
    d, m = facts.decode, facts.mixed
    return {
        "mla_v2.decode_kv_pages_per_block": d.num_kv_pages_per_block,
        "mla_v2.decode_queries_per_block": d.num_queries_per_block,
        "mla_v2.decode_batch_size": d.decode_batch_size,
        "mla_v2.prefill_kv_pages_per_block": m.num_kv_pages_per_block,
        "mla_v2.prefill_queries_per_block": m.num_queries_per_block,
        "mla_v2.mixed_kv_pages_per_block": m.num_kv_pages_per_block,
        "mla_v2.mixed_queries_per_block": m.num_queries_per_block,
        "mla_v2.mixed_q_split": m.q_split,
        "mla_v2.vmem_limit_bytes": vmem_core_bytes,
    }


def mla_v2_kernel_kwargs(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The MLA kernel's keyword arguments from the registry's flat knobs (names without the
    family prefix): per-case values become its (decode, prefill, mixed) tuples."""
    out: dict[str, Any] = {}
    for name in ("kv_pages_per_block", "queries_per_block"):
        values = [flat.get(f"{case}_{name}") for case in MLA_CASES]
        if all(v is not None for v in values):
            out[f"num_{name}"] = tuple(values)
    for name in ("decode_batch_size", "mixed_q_split", "vmem_limit_bytes"):
        if flat.get(name) is not None:
            out[name] = flat[name]
    return out


def kernel_arguments(family: str, flat: Mapping[str, Any]) -> dict[str, Any]:
    """A family's knobs (names without the family prefix) as its kernel's keyword arguments."""
    return mla_v2_kernel_kwargs(flat) if family == "mla_v2" else dict(flat)


# --------------------------------------------------------------------------- estimates
# tpu-inference's RPA v3 ``get_vmem_estimate_bytes`` and ``get_smem_estimate_bytes``.


def _has_bank_conflicts(stride: int, distance: int = 24, num_banks: int = 32) -> bool:
    """v3 kernel.py ``has_bank_conflicts``: a stride that maps rows onto the same banks."""
    return len({(i * stride) % num_banks for i in range(distance)}) < distance


def rpa_v3_vmem_bytes(w: Workload, bq_sz: int, bkv_sz: int) -> int:
    """``get_vmem_estimate_bytes``: double-buffered KV, q and output blocks and f32 scratch."""
    q_pack, kv_pack = packing(w.q_dtype), packing(w.kv_dtype)
    kv_heads = w.kv_heads_per_device
    q_per_kv = align(w.q_heads_per_device // kv_heads, q_pack)
    stride = cdiv(kv_heads * 2, kv_pack)
    if _has_bank_conflicts(stride):
        stride += 1
    head_dim = align(w.head_dim, HEAD_ALIGNMENT)
    bits = (
        2 * bkv_sz * stride * kv_pack * head_dim * (32 // kv_pack)
        + 2 * (2 * kv_heads * bq_sz * q_per_kv * head_dim) * (32 // q_pack)
        + 2 * (kv_heads * bq_sz * q_per_kv * 128) * 32
        + kv_heads * bq_sz * q_per_kv * head_dim * 32
    )
    return cdiv(bits, 8)


def rpa_v3_smem_bytes(max_num_seqs: int, pages_per_seq: int) -> int:
    """``get_smem_estimate_bytes``: the kernel's scalar-prefetched tables."""
    words = (
        align(max_num_seqs, 128)
        + align(max_num_seqs * pages_per_seq, 128)
        + align(max_num_seqs + 1, 128)
    )
    return cdiv((words + 4 * 128) * 32, 8)


# --------------------------------------------------------------------------- constraints

FAMILY_VMEM_KNOBS = (
    "rpa_v2.vmem_limit_bytes",
    "rpa_v3.vmem_limit_bytes",
    "rpa_v3_hd64.vmem_limit_bytes",
    "mla_v2.vmem_limit_bytes",
)
VMEM_KNOBS = ("vmem_limit_bytes", *FAMILY_VMEM_KNOBS)
HD64_KNOBS = ("rpa_v3_hd64.num_kv_pages_per_block", "rpa_v3_hd64.num_queries_per_block")

# Every rule, with the upstream check it mirrors ("registry": a rule of this project, stricter
# than upstream, with its reason). docs and tests iterate over this table.
RULES = {
    "page_power_of_two": (
        "registry: vLLM's page-size rule only yields powers of two; the tables and block formulas "
        "assume them"
    ),
    "page_smem_minimum": (
        "registry: vLLM / tpu-inference get_min_page_size (block tables of max_num_seqs sequences "
        "within half of SMEM); tpu_platform.py raises only its own page to it, and the vLLM "
        "plugin's page counts as user-given, so the registry holds every page to it"
    ),
    "knob_range": (
        "registry: every knob within its absolute range (tpu_registry/knobs.py), far beyond "
        "any real value: a value past it is a unit or exponent slip"
    ),
    "page_within_sequence": (
        "registry: a page larger than a whole sequence (next power of two of max_model_len) only "
        "wastes HBM (not held against the MLA backend's own fixed page)"
    ),
    "page_kv_packing": (
        "tpu-inference RPA v3 and hd64 static_validate_inputs: page_size % kv_packing == 0"
    ),
    "vmem_positive": (
        "tpu-inference RPA v3 and torch_xla RPA v2 static_validate_inputs: vmem_limit_bytes > 0"
    ),
    "vmem_within_core": "registry: a limit above the core's VMEM (catalog) cannot be met",
    "vmem_within_ceiling": "registry: each family's limit stays within the common vmem_limit_bytes",
    "head_padding": "tpu-inference get_kv_cache_shape: head dim aligned to 128 lanes",
    "rpa_v2_heads_tileable": (
        "torch_xla RPA v2 get_min_heads_per_blk raises when the KV heads cannot be tiled"
    ),
    "rpa_v2_kv_pages_in_range": (
        "torch_xla RPA v2 static_validate_inputs: 0 < num_kv_pages_per_block <= pages_per_seq"
    ),
    "rpa_v2_queries_in_range": (
        "torch_xla RPA v2 static_validate_inputs: num_queries_per_block > 0; registry: at most "
        "max_num_batched_tokens"
    ),
    "rpa_v3_float_kv": (
        "tpu-inference RPA v3 static_validate_inputs: integer KV caches are not supported"
    ),
    "rpa_v3_block_divisibility": (
        "tpu-inference RPA v3 static_validate_inputs: bq_sz % bq_csz == 0 and bkv_sz % bkv_csz == 0"
    ),
    "rpa_v3_kv_page_multiple": (
        "tpu-inference RPA v3 static_validate_inputs: bkv_sz and bkv_csz divisible by page_size"
    ),
    "rpa_v3_kv_block_bounds": "registry: bkv_csz <= bkv_sz <= the tokens of a whole sequence",
    "rpa_v3_q_block_bounds": (
        "registry: query blocks within next_power_of_2(max_num_batched_tokens), as "
        "get_default_block_sizes bounds them"
    ),
    "rpa_v3_vmem_estimate": (
        "tpu-inference RPA v3 get_vmem_estimate_bytes must not exceed rpa_v3.vmem_limit_bytes"
    ),
    "rpa_v3_smem_estimate": (
        "tpu-inference RPA v3 get_smem_estimate_bytes must not exceed the core's SMEM"
    ),
    "rpa_v3_hd64_float_kv": (
        "tpu-inference hd64 static_validate_inputs: integer KV caches are not supported"
    ),
    "rpa_v3_hd64_blocks_in_range": (
        "tpu-inference hd64 static_validate_inputs: num_kv_pages_per_block > 0 and "
        "num_queries_per_block > 0; registry: at most pages_per_seq and max_num_batched_tokens, "
        "as get_tuned_block_sizes clamps them"
    ),
    "rpa_v3_hd64_vmem_estimate": (
        "registry: tpu-inference hd64 get_vmem_estimate_bytes within rpa_v3_hd64.vmem_limit_bytes "
        "(the kernel allocates these blocks in VMEM)"
    ),
    "rpa_v3_hd64_smem_estimate": (
        "tpu-inference hd64 get_smem_estimate_bytes must not exceed the core's SMEM"
    ),
    "mla_v2_float_kv": (
        "tpu-inference MLA v2 static_validate_inputs: integer KV caches are not supported"
    ),
    "mla_v2_kv_packing": (
        "tpu-inference MLA v2 static_validate_inputs: kv_packing (MLA_KV_PACKING_SIZE) % the KV "
        "dtype's packing == 0"
    ),
    "mla_v2_page_packing": (
        "registry: MLA get_kv_cache_shape rounds a page up to kv_packing tokens and the kernel "
        "then reads pages of that size, so page_size % kv_packing == 0 or tokens land in the "
        "wrong page"
    ),
    "mla_v2_q_split_divides": (
        "tpu-inference MLA v2 static_validate_inputs: num_queries_per_blocks[2] % mixed_q_split "
        "== 0"
    ),
}


def check(
    spec: Generation,
    w: Workload,
    knobs: Mapping[str, Any],
    *,
    defaults: frozenset[str] = frozenset(),
) -> list[Violation]:
    """Every rule a final set of knobs must satisfy, as structured violations.

    ``defaults`` names knobs whose values are the kernel's own defaults (the baseline): the
    rules a kernel applies only to explicit arguments do not apply to them, because the
    adapters leave such values to the kernel rather than pass them.
    """
    out: list[Violation] = []

    def bad(rule: str, knobs_: tuple[str, ...], message: str, hint: str = "") -> None:
        out.append(Violation(rule, knobs_, message, hint=hint))

    chip = spec.chip
    vmem = chip.vmem_bytes_per_core
    families = families_for(spec, w)
    for name, value in knobs.items():
        if name not in defaults and knob_registry.out_of_range(name, value):
            bad(
                "knob_range",
                (name,),
                f"{name} {value} is outside its range",
                "see docs/overrides.md",
            )
    page = knobs.get("page_size")
    if page is not None:
        if page <= 0 or page & (page - 1):
            bad(
                "page_power_of_two",
                ("page_size",),
                f"page_size {page} is not a positive power of two",
                "use 16, 32, 64, 128 or 256",
            )
            page = None
    if page is not None:
        floor = min_page_size(
            chip.smem_bytes_per_core, w.max_model_len, w.max_num_seqs, where=spec.id
        )
        if page < floor:
            msg = (
                f"page_size {page} is below the SMEM minimum page {floor} for max_model_len "
                f"{w.max_model_len} and max_num_seqs {w.max_num_seqs} on {spec.id}"
            )
            bad(
                "page_smem_minimum",
                ("page_size",),
                msg,
                f"use a page of at least {floor}, or lower max_num_seqs",
            )
        most = next_pow2(w.max_model_len)
        if page > most and not (w.is_mla and "page_size" in defaults):
            msg = (
                f"page_size {page} is above {most}, the most a sequence of max_model_len "
                f"{w.max_model_len} needs"
            )
            bad("page_within_sequence", ("page_size",), msg, f"use a page of at most {most}")
        if ("rpa_v3" in families or "rpa_v3_hd64" in families) and page % packing(w.kv_dtype):
            msg = (
                f"page_size {page} is not a multiple of the {w.kv_dtype} packing "
                f"{packing(w.kv_dtype)}"
            )
            bad("page_kv_packing", ("page_size",), msg)
    for name in VMEM_KNOBS:
        v = knobs.get(name)
        if v is None:
            continue
        if v <= 0:
            bad("vmem_positive", (name,), f"{name} {v} is not positive")
        elif v > vmem:
            mib = chip.vmem_mib_per_core
            bad(
                "vmem_within_core",
                (name,),
                f"{name} {v} is above the {spec.id} core VMEM of {vmem} bytes ({mib:g} MiB)",
                f"use at most {vmem}",
            )
    ceiling = knobs.get("vmem_limit_bytes")
    for name in FAMILY_VMEM_KNOBS:
        v = knobs.get(name)
        if v is not None and ceiling is not None and ceiling < v <= vmem:
            bad(
                "vmem_within_ceiling",
                (name, "vmem_limit_bytes"),
                f"{name} {v} is above vmem_limit_bytes {ceiling}",
                f"use at most {ceiling}, or raise vmem_limit_bytes",
            )
    hd = knobs.get("head_dim_padded")
    if hd is not None and (hd < w.head_dim or hd % chip.lanes):
        msg = (
            f"head_dim_padded {hd} must be at least head_dim {w.head_dim} and a multiple of "
            f"{chip.lanes} lanes"
        )
        bad("head_padding", ("head_dim_padded",), msg)
    if page is None:
        return out
    pages_per_seq = cdiv(w.max_model_len, page)
    v2 = [
        k for k in ("rpa_v2.num_kv_pages_per_block", "rpa_v2.num_queries_per_block") if k in knobs
    ]
    if (
        v2
        and min_heads_per_block(
            w.q_heads_per_device, 2 * w.kv_heads_per_device, w.q_dtype, w.kv_dtype
        )
        is None
    ):
        msg = (
            f"{v2[0]}: {2 * w.kv_heads_per_device} combined KV heads cannot be tiled for "
            f"{w.kv_dtype}"
        )
        bad("rpa_v2_heads_tileable", (v2[0],), msg, "the RPA v2 kernel cannot run this shape")
    bkv = knobs.get("rpa_v2.num_kv_pages_per_block")
    if bkv is not None and not 0 < bkv <= pages_per_seq:
        msg = (
            f"rpa_v2.num_kv_pages_per_block {bkv} must be in 1..{pages_per_seq} (pages per "
            "sequence)"
        )
        bad("rpa_v2_kv_pages_in_range", ("rpa_v2.num_kv_pages_per_block",), msg)
    bq = knobs.get("rpa_v2.num_queries_per_block")
    if bq is not None and not 0 < bq <= w.max_num_batched_tokens:
        msg = (
            f"rpa_v2.num_queries_per_block {bq} must be in 1..{w.max_num_batched_tokens} (max "
            "batched tokens)"
        )
        bad("rpa_v2_queries_in_range", ("rpa_v2.num_queries_per_block",), msg)
    v3 = [k for k in (*RPA_V3_CASES.values(), "rpa_v3.vmem_limit_bytes") if k in knobs]
    if v3 and w.kv_dtype == "int8":
        bad(
            "rpa_v3_float_kv",
            (v3[0],),
            f"{v3[0]}: the RPA v3 kernel does not take an int8 KV cache",
            "use a floating-point KV dtype (bf16, fp8)",
        )
    max_kv = pages_per_seq * page
    max_q = next_pow2(w.max_num_batched_tokens)
    v3_vmem = knobs.get("rpa_v3.vmem_limit_bytes")
    for name in RPA_V3_CASES.values():
        t = knobs.get(name)
        if t is None:
            continue
        bq_sz, bkv_sz, bq_csz, bkv_csz = t
        if min(t) <= 0:
            bad("rpa_v3_block_divisibility", (name,), f"{name} {t} must be positive")
            continue
        if name not in defaults:
            if bq_sz % bq_csz or bkv_sz % bkv_csz:
                msg = f"{name} {t}: bq_sz must be a multiple of bq_csz and bkv_sz of bkv_csz"
                bad("rpa_v3_block_divisibility", (name,), msg)
            if bkv_sz % page or bkv_csz % page:
                msg = f"{name} {t}: KV block sizes must be multiples of page_size {page}"
                bad("rpa_v3_kv_page_multiple", (name, "page_size"), msg)
        if bkv_sz > align(max_kv, page) or bkv_csz > bkv_sz:
            msg = (
                f"{name} {t}: KV blocks must satisfy bkv_csz <= bkv_sz <= {max_kv} (tokens per "
                "sequence)"
            )
            bad("rpa_v3_kv_block_bounds", (name,), msg)
        if max(bq_sz, bq_csz) > max_q:
            msg = f"{name} {t}: query blocks must be within {max_q} batched tokens"
            bad("rpa_v3_q_block_bounds", (name,), msg)
        if v3_vmem is not None and w.kv_dtype != "int8":
            need = rpa_v3_vmem_bytes(w, bq_sz, bkv_sz)
            if need > v3_vmem:
                msg = (
                    f"{name} {t} needs {need} bytes of VMEM, above rpa_v3.vmem_limit_bytes "
                    f"{v3_vmem}"
                )
                bad(
                    "rpa_v3_vmem_estimate",
                    (name, "rpa_v3.vmem_limit_bytes"),
                    msg,
                    "use smaller blocks or a larger VMEM limit",
                )
    _check_hd64(spec, w, knobs, page, bad)
    _check_mla(spec, w, knobs, page, bad)
    if v3:
        need = rpa_v3_smem_bytes(w.max_num_seqs, pages_per_seq)
        if need > chip.smem_bytes_per_core:
            msg = (
                f"page_size {page}: the RPA v3 kernel's tables take {need} bytes of SMEM, above "
                f"the {spec.id} core's {chip.smem_bytes_per_core}"
            )
            bad(
                "rpa_v3_smem_estimate",
                ("page_size",),
                msg,
                "use a larger page or lower max_num_seqs",
            )
    return out


def _check_hd64(spec: Generation, w: Workload, knobs: Mapping[str, Any], page: int, bad) -> None:
    present = [k for k in (*HD64_KNOBS, "rpa_v3_hd64.vmem_limit_bytes") if k in knobs]
    if not present:
        return
    if w.kv_dtype == "int8":
        bad(
            "rpa_v3_hd64_float_kv",
            (present[0],),
            f"{present[0]}: the head-dim-64 RPA v3 kernel does not take an int8 KV cache",
            "use a floating-point KV dtype (bf16, fp8)",
        )
        return
    pages_per_seq = cdiv(w.max_model_len, page)
    bkv_p = knobs.get(HD64_KNOBS[0])
    if bkv_p is not None and not 0 < bkv_p <= pages_per_seq:
        msg = f"{HD64_KNOBS[0]} {bkv_p} must be in 1..{pages_per_seq} (pages per sequence)"
        bad("rpa_v3_hd64_blocks_in_range", (HD64_KNOBS[0],), msg)
        bkv_p = None
    bq = knobs.get(HD64_KNOBS[1])
    if bq is not None and not 0 < bq <= w.max_num_batched_tokens:
        msg = f"{HD64_KNOBS[1]} {bq} must be in 1..{w.max_num_batched_tokens} (max batched tokens)"
        bad("rpa_v3_hd64_blocks_in_range", (HD64_KNOBS[1],), msg)
        bq = None
    limit = knobs.get("rpa_v3_hd64.vmem_limit_bytes")
    if bkv_p is not None and bq is not None and limit is not None and limit > 0:
        need = rpa_v3_hd64_vmem_bytes(w, bq, bkv_p * page)
        if need > limit:
            msg = (
                f"rpa_v3_hd64 blocks of {bkv_p} pages and {bq} queries need {need} bytes of VMEM, "
                f"above rpa_v3_hd64.vmem_limit_bytes {limit}"
            )
            bad(
                "rpa_v3_hd64_vmem_estimate",
                (*HD64_KNOBS, "rpa_v3_hd64.vmem_limit_bytes"),
                msg,
                "use smaller blocks or a larger VMEM limit",
            )
    need = rpa_v3_smem_bytes(w.max_num_seqs, pages_per_seq)  # hd64's estimate is the same sum
    if need > spec.chip.smem_bytes_per_core:
        msg = (
            f"page_size {page}: the head-dim-64 RPA v3 kernel's tables take {need} bytes of "
            f"SMEM, above the {spec.id} core's {spec.chip.smem_bytes_per_core}"
        )
        bad(
            "rpa_v3_hd64_smem_estimate",
            ("page_size",),
            msg,
            "use a larger page or lower max_num_seqs",
        )


def _check_mla(spec: Generation, w: Workload, knobs: Mapping[str, Any], page: int, bad) -> None:
    present = [k for k in knobs if k.startswith("mla_v2.")]
    facts = spec.kernels.mla_v2
    if not present or facts is None:
        return
    if w.kv_dtype == "int8":
        bad(
            "mla_v2_float_kv",
            (present[0],),
            f"{present[0]}: the MLA v2 kernel does not take an int8 KV cache",
            "use a floating-point KV dtype (bf16, fp8)",
        )
        return
    pack = facts.kv_packing
    if pack % packing(w.kv_dtype):
        msg = (
            f"the MLA kv_packing {pack} of {spec.id} is not a multiple of the {w.kv_dtype} "
            f"packing {packing(w.kv_dtype)}"
        )
        bad("mla_v2_kv_packing", (present[0],), msg, "fix [kernels.mla_v2] kv_packing")
    if page % pack:
        msg = (
            f"page_size {page} is not a multiple of the MLA kv_packing {pack}: the cache rounds "
            f"each page up to {align(page, pack)} tokens and the kernel reads pages of that size"
        )
        bad("mla_v2_page_packing", ("page_size",), msg, f"use a page that is a multiple of {pack}")
    bq, split = knobs.get("mla_v2.mixed_queries_per_block"), knobs.get("mla_v2.mixed_q_split")
    if bq is not None and split is not None and split > 0 and bq % split:
        msg = (
            f"mla_v2.mixed_queries_per_block {bq} is not a multiple of mla_v2.mixed_q_split {split}"
        )
        bad(
            "mla_v2_q_split_divides",
            ("mla_v2.mixed_queries_per_block", "mla_v2.mixed_q_split"),
            msg,
            "use a query block that the split divides",
        )
