"""The baseline policy: what upstream computes today, derived from catalog facts.

- Page size, minimum page size and max sequences: vLLM's TPU formulas (``PallasAttentionBackend``
  in vLLM <= 0.13, ``tpu_inference`` since), with SMEM read from the catalog instead of a
  1 MiB constant.
- Head dim padded to the lane width (128), never to the MXU width.
- RPA v2 (torch_xla / JAX ``ragged_paged_attention``): default blocks from the catalog, halved
  while the block buffers would take the catalog's VMEM threshold or more; VMEM limit as
  torch_xla passes it, capped at the core's VMEM.
- RPA v3 (tpu-inference ``get_default_block_sizes``): the same arithmetic, with the numbers
  upstream switches on per TPU version carried by each generation file.
"""

from __future__ import annotations

from tpu_registry.detect import Detection
from tpu_registry.errors import Problem, TuningError
from tpu_registry.hookspecs import hookimpl
from tpu_registry.spec import Generation
from tpu_registry.tune import DTYPE_BITS, Layer, Workload, align, cdiv, next_pow2, vmem_bytes

# vLLM's page-size rule: aim for 16 pages per sequence (scalar registers spill with more),
# within [16, 256]; past 8192 tokens use 16 (a VMEM-OOM workaround upstream).
PAGES_PER_SEQ_TARGET = 16
MIN_PAGE, MAX_PAGE = 16, 256
LONG_CONTEXT = 8192
# Block tables take 4 bytes per page and may use half of SMEM.
BLOCK_TABLE_ENTRY_BYTES = 4
SMEM_SHARE = 2


def packing(dtype: str) -> int:
    return 32 // DTYPE_BITS[dtype]


def itemsize(dtype: str) -> int:
    return DTYPE_BITS[dtype] // 8


def page_size_for(max_model_len: int) -> int:
    if max_model_len > LONG_CONTEXT:
        return MIN_PAGE
    return min(max(next_pow2(max_model_len) // PAGES_PER_SEQ_TARGET, MIN_PAGE), MAX_PAGE)


def max_pages_per_seq(smem_bytes: int, max_num_seqs: int) -> int:
    return smem_bytes // SMEM_SHARE // max_num_seqs // BLOCK_TABLE_ENTRY_BYTES


def min_page_size(spec: Generation, w: Workload) -> int:
    per_req = max_pages_per_seq(spec.chip.smem_bytes_per_core, w.max_num_seqs)
    if per_req == 0:
        limit = spec.chip.smem_bytes_per_core // SMEM_SHARE // BLOCK_TABLE_ENTRY_BYTES
        raise TuningError([Problem("workload", None, "max_num_seqs", f"{w.max_num_seqs} sequences leave no SMEM for block tables on {spec.id} (at most {limit})", "lower max_num_seqs")])
    return next_pow2(cdiv(w.max_model_len, per_req))


def max_num_seqs_for(spec: Generation, max_model_len: int, page: int) -> int:
    return spec.chip.smem_bytes_per_core // SMEM_SHARE // cdiv(max_model_len, page) // BLOCK_TABLE_ENTRY_BYTES


def min_heads_per_block(num_q_heads: int, num_combined_kv: int, q_dtype: str, kv_dtype: str) -> tuple[int, int] | None:
    """Heads the RPA v2 kernel processes per block (None: the KV heads cannot be tiled)."""
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


def rpa_v2_block_bytes(bkv: int, bq: int, q_heads_blk: int, kv_heads_blk: int, head_dim: int, page: int, q_dtype: str, kv_dtype: str) -> int:
    """VMEM the RPA v2 blocks take: double-buffered q in/out, KV, and f32 scratch."""
    q_block = bq * q_heads_blk * head_dim * itemsize(q_dtype)
    kv_block = 2 * bkv * page * 2 * kv_heads_blk * head_dim * itemsize(kv_dtype)
    lm = kv_heads_blk * bq * 2 * (q_heads_blk // kv_heads_blk) * 128 * 4
    acc = bq * q_heads_blk * head_dim * 4
    return 2 * (q_block + q_block) + kv_block + 2 * lm + acc


def rpa_v2_knobs(spec: Generation, w: Workload, page: int) -> dict[str, int] | str:
    facts = spec.kernels.rpa_v2
    assert facts is not None
    head_dim = align(w.head_dim, spec.chip.lanes)
    heads = min_heads_per_block(w.q_heads_per_device, 2 * w.kv_heads_per_device, w.q_dtype, w.kv_dtype)
    if heads is None:
        return f"rpa_v2: {2 * w.kv_heads_per_device} combined KV heads cannot be tiled for {w.kv_dtype}"
    q_blk, kv_blk = heads[0], heads[1] // 2
    bkv, bq = facts.default_num_kv_pages_per_block, facts.default_num_queries_per_block
    if facts.halve_kv_block_at_vmem_mib is not None:
        threshold = vmem_bytes(facts.halve_kv_block_at_vmem_mib)
        while bkv > 1 and rpa_v2_block_bytes(bkv, bq, q_blk, kv_blk, head_dim, page, w.q_dtype, w.kv_dtype) >= threshold:
            bkv //= 2
    pages_per_seq = cdiv(w.max_model_len, page)
    return {
        "rpa_v2.num_kv_pages_per_block": min(pages_per_seq, max(bkv, 1)),
        "rpa_v2.num_queries_per_block": min(w.max_num_batched_tokens, bq),
        "rpa_v2.vmem_limit_bytes": min(vmem_bytes(facts.vmem_limit_mib), spec.chip.vmem_bytes_per_core),
    }


def rpa_v3_block_sizes(spec: Generation, w: Workload, page: int, case: str) -> tuple[int, int, int, int]:
    f = spec.kernels.rpa_v3
    assert f is not None
    kv_pack = packing(w.kv_dtype)
    kv_heads_x2 = next_pow2(align(w.kv_heads_per_device * 2, kv_pack))
    head_dim = align(w.head_dim, 128)
    q_per_kv = next_pow2(w.q_heads_per_device // w.kv_heads_per_device)
    max_q = next_pow2(w.max_num_batched_tokens)
    max_kv = cdiv(w.max_model_len, page) * page
    if case == "decode":
        bkv = min(f.decode_kv_bytes * kv_pack // 4 // head_dim // kv_heads_x2, max_kv)
        bq_sz, bkv_sz, bq_csz, bkv_csz = 1, bkv, 1, bkv
    else:
        bq_sz = min(f.prefill_q_budget // q_per_kv, max_q // f.prefill_q_max_divisor)
        bkv_sz = min(f.prefill_kv_tokens, max_kv // f.prefill_kv_max_divisor)
        bq_csz = min(f.chunk_q_budget // q_per_kv, max_q // f.chunk_q_max_divisor)
        bkv_csz = min(f.chunk_kv_tokens, align(max_kv // 2, page))
    return max(1, bq_sz), align(bkv_sz, page), max(1, bq_csz), align(bkv_csz, page)


def rpa_v3_knobs(spec: Generation, w: Workload, page: int) -> dict:
    f = spec.kernels.rpa_v3
    assert f is not None
    vmem = spec.chip.vmem_bytes_per_core if f.vmem_limit_mib is None else min(vmem_bytes(f.vmem_limit_mib), spec.chip.vmem_bytes_per_core)
    return {
        "rpa_v3.d_block_sizes": rpa_v3_block_sizes(spec, w, page, "decode"),
        "rpa_v3.p_block_sizes": rpa_v3_block_sizes(spec, w, page, "prefill"),
        "rpa_v3.m_block_sizes": rpa_v3_block_sizes(spec, w, page, "mixed"),
        "rpa_v3.vmem_limit_bytes": vmem,
    }


@hookimpl(trylast=True)
def tpu_registry_tune(spec: Generation, workload: Workload, detection: Detection) -> Layer:
    w = workload
    floor = min_page_size(spec, w)
    page = w.page_size if w.page_size is not None else max(page_size_for(w.max_model_len), floor)
    knobs: dict = {
        "head_dim_padded": align(w.head_dim, spec.chip.lanes),
        "page_size": page,
        "min_page_size": floor,
        "max_num_seqs_smem": max_num_seqs_for(spec, w.max_model_len, page),
        "vmem_limit_bytes": spec.chip.vmem_bytes_per_core,
    }
    notes = []
    if "rpa_v2" in spec.kernels.families:
        v2 = rpa_v2_knobs(spec, w, page)
        if isinstance(v2, str):
            notes.append(v2)
        else:
            knobs.update(v2)
    if "rpa_v3" in spec.kernels.families:
        knobs.update(rpa_v3_knobs(spec, w, page))
    if not spec.kernels.families:
        notes.append(f"no paged-attention kernel supports {spec.id}; only common knobs are given")
    return Layer("baseline", knobs, "; ".join(notes))
