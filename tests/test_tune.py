"""Tuning: the baseline against upstream's own formulas, tables, overrides, plugins, the plan."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import fields
from itertools import product

import pytest
from conftest import HARDWARE, REPO, SHAPE, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpu_registry import Workload, resolve
from tpu_registry.attention import kv_bytes_per_token, plan
from tpu_registry.catalog import load_catalog
from tpu_registry.detection import reconcile
from tpu_registry.errors import TuningError
from tpu_registry.kernels import check as check_constraints
from tpu_registry.plugins import get_plugin_manager
from tpu_registry.policies import baseline
from tpu_registry.policies import overrides as overrides_policy
from tpu_registry.policies.tables import load_tables, table_folders
from tpu_registry.tomlfile import tomllib

MIB = 1024 * 1024

# ---------------------------------------------------------------------------------------------
# Upstream's formulas, transcribed with their version switches and constants (vLLM 0.13
# pallas.py / tpu-inference 0.32 flash_attn.py; tpu-inference 0.32 v3 kernel
# get_default_block_sizes; torch_xla 2.9 ragged_paged_attention_v2.get_tuned_block_sizes).
# The baseline derives the same numbers from catalog fields; these must agree.
# ---------------------------------------------------------------------------------------------

UPSTREAM_VERSION = {"v4": 4, "v5e": 5, "v5p": 5, "v6e": 6, "tpu7x": 7, "tpu8t": 8, "tpu8i": 8}
JAX_VMEM = {
    "v4": 16 * MIB,
    "v5e": 128 * MIB,
    "v5p": 64 * MIB,
    "v6e": 128 * MIB,
    "tpu7x": 64 * MIB,
    "tpu8i": 192 * MIB,
    "tpu8t": 128 * MIB,
}
BITS = {"bfloat16": 16, "float8_e4m3fn": 8, "float8_e5m2": 8, "int8": 8, "float32": 32}


def up_packing(dtype):
    """torch_xla / tpu-inference ``get_dtype_packing``: 32 // bit width."""
    return 32 // BITS[dtype]


def up_heads_per_device(q_heads, kv_heads, tp):
    """vLLM: query heads split over the tensor-parallel devices; KV heads too, replicated
    when there are fewer of them than devices (``max(1, total // tp)``)."""
    return q_heads // tp, max(1, kv_heads // tp)


def up_min_heads_per_blk(num_q_heads, num_combined_kv_heads, q_dtype, kv_dtype):
    """torch_xla 2.9 ragged_paged_attention_v2.get_min_heads_per_blk (None where it raises
    "can not be XLA fully tiled")."""
    q_packing, kv_packing = up_packing(q_dtype), up_packing(kv_dtype)

    def can_be_xla_fully_tiled(x, packing):
        if x % packing != 0:
            return False
        x //= packing
        return x in (1, 2, 4, 8) or x % 8 == 0

    if not can_be_xla_fully_tiled(num_combined_kv_heads, kv_packing):
        return None
    ratio = num_q_heads // (num_combined_kv_heads // 2)
    max_combined_kv_tiling = 8 * kv_packing
    min_combined_kv_heads = (
        max_combined_kv_tiling
        if num_combined_kv_heads % max_combined_kv_tiling == 0
        else num_combined_kv_heads
    )
    min_q_heads = min_combined_kv_heads // 2 * ratio
    if can_be_xla_fully_tiled(min_q_heads, q_packing):
        return min_q_heads, min_combined_kv_heads
    return num_q_heads, num_combined_kv_heads


def pow2(x):
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def cdiv(a, b):
    return -(-a // b)


def align_to(x, a):
    return cdiv(x, a) * a


def up_page_size(max_model_len):
    if max_model_len > 8192:
        return 16
    page = pow2(max_model_len) // 16
    return 16 if page <= 16 else 256 if page >= 256 else page


def up_min_page_size(max_model_len, max_num_seqs):
    per_req = 1024 * 1024 // 2 // max_num_seqs // 4
    return 1 << (cdiv(max_model_len, per_req) - 1).bit_length()


def up_max_num_seqs(model_len, page_size):
    return 1024 * 1024 // 2 // cdiv(model_len, page_size) // 4


def up_rpa_v3(
    version,
    q_dtype,
    kv_dtype,
    q_heads,
    kv_heads,
    head_dim,
    page,
    max_num_tokens,
    pages_per_seq,
    case,
):
    kv_packing = 32 // BITS[kv_dtype]
    kv_x2 = pow2(align_to(kv_heads * 2, kv_packing))
    head_dim = align_to(head_dim, 128)
    qpk = pow2(q_heads // kv_heads)
    max_q = pow2(max_num_tokens)
    max_kv = pages_per_seq * page
    peak = 16 * 1024 * 1024 * kv_packing // 4 // head_dim // kv_x2
    if version in (5, 6):
        if case == "decode":
            bq, bkv, bqc, bkvc = 1, min(peak, max_kv), 1, min(peak, max_kv)
        else:
            bq, bkv = min(1024 // qpk, max_q // 2), min(1024, max_kv)
            bqc, bkvc = min(512 // qpk, max_q), min(512, align_to(max_kv // 2, page))
    elif version in (7, 8):
        if case == "decode":
            bq, bkv, bqc, bkvc = 1, min(peak, max_kv), 1, min(peak, max_kv)
        else:
            bq, bkv = min(2048 // qpk, max_q // 2), min(2048, max_kv // 2)
            bqc, bkvc = min(1024 // qpk, max_q // 2), min(512, align_to(max_kv // 2, page))
    else:
        raise NotImplementedError(version)
    return (max(1, bq), align_to(bkv, page), max(1, bqc), align_to(bkvc, page))


def up_vmem(kv_dtype, q_heads, kv_heads, head_dim, bq_sz, bkv_sz, q_dtype="bfloat16"):
    """tpu-inference RPA v3 get_vmem_estimate_bytes, transcribed."""
    q_packing, kv_packing = 32 // BITS[q_dtype], 32 // BITS[kv_dtype]
    q_per_kv = align_to(q_heads // kv_heads, q_packing)
    stride = cdiv(kv_heads * 2, kv_packing)
    if len({(i * stride) % 32 for i in range(24)}) < 24:  # has_bank_conflicts
        stride += 1
    head_dim = align_to(head_dim, 128)
    bits = (
        (2 * bkv_sz * stride * kv_packing * head_dim) * (32 // kv_packing)
        + 2 * (2 * kv_heads * bq_sz * q_per_kv * head_dim) * (32 // q_packing)
        + 2 * (kv_heads * bq_sz * q_per_kv * 128) * 32
        + (kv_heads * bq_sz * q_per_kv * head_dim) * 32
    )
    return cdiv(bits, 8)


# tpu-inference 0.32 kernel_hd64.py: get_tuned_block_sizes' per-version fallback and clamp,
# DEFAULT_VMEM_LIMIT_BYTES, and get_vmem_estimate_bytes.
UP_HD64_FALLBACK_KV = {4: 512, 7: 4096}  # `case _`: 2048


def up_hd64(version, page, pages_per_seq, tokens):
    bkv_p = UP_HD64_FALLBACK_KV.get(version, 2048) // page
    return min(pages_per_seq, bkv_p), min(tokens, 32)


def up_hd64_vmem(kv_dtype, q_heads, kv_heads, bq_sz, bkv_sz, q_dtype):
    q_pack, kv_pack = up_packing(q_dtype), up_packing(kv_dtype)
    q_per_kv = align_to(q_heads // kv_heads, q_pack)
    bits = (
        (2 * bkv_sz * align_to(kv_heads, kv_pack) * 128) * (32 // kv_pack)
        + 2 * (2 * kv_heads * bq_sz * q_per_kv * 128) * (32 // q_pack)
        + 2 * (kv_heads * bq_sz * q_per_kv * 128) * 32
        + (kv_heads * bq_sz * q_per_kv * 128) * 32
    )
    return cdiv(bits, 8)


def up_rpa_v2(
    version, q_dtype, kv_dtype, q_heads_blk, kv_heads_blk, head_dim, page, max_tokens, pages_per_seq
):
    bkv, bq = 128, 32
    qsize, kvsize = BITS[q_dtype] // 8, BITS[kv_dtype] // 8

    def vmem(n):
        q_block = bq * q_heads_blk * head_dim * qsize
        kv_block = 2 * n * page * 2 * kv_heads_blk * head_dim * kvsize
        lm = kv_heads_blk * bq * 2 * (q_heads_blk // kv_heads_blk) * 128 * 4
        acc = bq * q_heads_blk * head_dim * 4
        return 2 * (q_block + q_block) + kv_block + lm + lm + acc

    while vmem(bkv) >= 64 * MIB:
        bkv //= 2
    bkv = max(bkv, 1)
    if version == 4:
        bkv, bq = 32, 32
    return min(pages_per_seq, bkv), min(max_tokens, bq)


HEADS = [(32, 8), (8, 1), (16, 16), (64, 8), (28, 4), (12, 2), (40, 8)]  # q, kv heads
# The tp = 1, bf16-query, formula-page grid, in full.
GRID = [
    (q, kv, hd, "bfloat16", kv_dtype, L, seqs, tokens, 1, None)
    for (q, kv), hd, kv_dtype, L, seqs, tokens in product(
        HEADS,
        [64, 128, 256],  # head dim
        ["bfloat16", "float8_e4m3fn"],  # kv dtype
        [128, 1000, 2048, 4096, 8192, 16384, 131072],  # max_model_len
        [8, 256, 1024],  # max_num_seqs
        [512, 2048, 8192],  # max_num_batched_tokens
    )
]
# A fixed-seed sample of the wider product: tensor parallelism (with fewer KV heads than
# devices), every KV dtype, f32 queries, pages fixed by the user.
WIDE = [
    (q, kv, hd, q_dtype, kv_dtype, L, seqs, tokens, tp, page)
    for (q, kv), hd, q_dtype, kv_dtype, L, seqs, tokens, tp, page in product(
        HEADS + [(32, 4), (16, 2)],
        [64, 128, 256],
        ["bfloat16", "float32"],
        ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int8"],
        [128, 1000, 2048, 4096, 8192, 16384, 131072],
        [8, 256, 1024],
        [512, 2048, 8192],
        [1, 2, 4, 8, 16],
        [None, 16, 64, 256],
    )
    if q % tp == 0 and (page is None or page <= pow2(L))
]
GRID += random.Random(17).sample(WIDE, 10000)


def _coverage(grid):
    """What the sample must contain for the grid to pin what it is meant to."""
    seen = {
        "tp": {row[8] for row in grid},
        "kv_replicated": any(row[1] < row[8] for row in grid),
        "kv_split": any(1 < row[8] < row[1] for row in grid),
        "q_dtype": {row[3] for row in grid},
        "kv_dtype": {row[4] for row in grid},
        "user_page": {row[9] for row in grid},
    }
    assert seen == {
        "tp": {1, 2, 4, 8, 16},
        "kv_replicated": True,
        "kv_split": True,
        "q_dtype": {"bfloat16", "float32"},
        "kv_dtype": {"bfloat16", "float8_e4m3fn", "float8_e5m2", "int8"},
        "user_page": {None, 16, 64, 256},
    }


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


def _knobs(spec, w):
    return baseline.tpu_registry_tune(spec, w).knobs


@pytest.mark.parametrize("gid", ["v4", "v5e", "v5p", "v6e", "tpu7x", "tpu8t", "tpu8i"])
def test_baseline_equals_upstream_formulas(cat, gid):
    """Page size, minimum page size, max sequences, head padding, RPA v2 and v3 defaults, for
    tp = 1 in full and a sample with tensor parallelism, every KV dtype, f32 queries and
    user-fixed pages. Heads per device, packings and pages are computed here, never read
    from the workload or the kernels module."""
    _coverage(GRID)
    spec = cat[gid]
    version = UPSTREAM_VERSION[gid]
    limit = JAX_VMEM[gid]
    checked = shrunk = refused = no_v3 = 0
    for q_all, kv_all, hd, q_dtype, kv_dtype, L, seqs, tokens, tp, user_page in GRID:
        w = Workload(
            q_all,
            kv_all,
            hd,
            q_dtype=q_dtype,
            kv_dtype=kv_dtype,
            max_model_len=L,
            max_num_seqs=seqs,
            max_num_batched_tokens=tokens,
            tensor_parallel=tp,
            page_size=user_page,
        )
        q, kv = up_heads_per_device(q_all, kv_all, tp)
        page = user_page or max(up_page_size(L), up_min_page_size(L, seqs))
        pages = cdiv(L, page)
        # tpu-inference runs head dim 64 through kernel_hd64, every other through kernel.py
        v3 = "rpa_v3" in spec.kernels.families and kv_dtype != "int8" and hd != 64
        hd64 = "rpa_v3_hd64" in spec.kernels.families and kv_dtype != "int8" and hd == 64
        if v3 and up_vmem(kv_dtype, q, kv, hd, 1, page, q_dtype) > limit:
            # Not even one query and one page fit upstream's VMEM estimate: refused.
            with pytest.raises(TuningError, match="rpa_v3_vmem_estimate"):
                _knobs(spec, w)
            refused += 1
            continue
        k = _knobs(spec, w)
        # Kernel arguments are whole numbers (a "/" for a "//" would still compare equal).
        assert all(type(v) is int or {type(x) for x in v} == {int} for v in k.values()), (gid, w)
        assert k["page_size"] == page
        assert k["min_page_size"] == up_min_page_size(L, seqs)
        assert k["max_num_seqs_smem"] == up_max_num_seqs(L, page)
        assert k["head_dim_padded"] == cdiv(hd, 128) * 128
        if "rpa_v3" in spec.kernels.families and (kv_dtype == "int8" or hd == 64):
            # tpu-inference's v3 kernel refuses integer KV caches, and head dim 64 runs the
            # hd64 kernel: no v3 knob at all.
            assert not [n for n in k if n.startswith("rpa_v3.")], (gid, w)
            no_v3 += 1
        if hd64:
            want = up_hd64(version, page, pages, tokens)
            vmem = min(100 * MIB, limit)  # DEFAULT_VMEM_LIMIT_BYTES, capped at the core
            got = (k["rpa_v3_hd64.num_kv_pages_per_block"], k["rpa_v3_hd64.num_queries_per_block"])
            if (
                want[0] >= 1
                and up_hd64_vmem(kv_dtype, q, kv, want[1], want[0] * page, q_dtype) <= vmem
            ):
                assert got == want, (gid, w)
            else:  # no whole page in the fallback, or too much VMEM: the nearest that runs
                shrunk += 1
                assert 1 <= got[0] <= max(1, want[0]) and 1 <= got[1] <= want[1], (gid, w)
                assert up_hd64_vmem(kv_dtype, q, kv, got[1], got[0] * page, q_dtype) <= vmem
            assert k["rpa_v3_hd64.vmem_limit_bytes"] == vmem
        elif "rpa_v3_hd64" in spec.kernels.families:
            assert not [n for n in k if n.startswith("rpa_v3_hd64.")], (gid, w)
        if v3:
            for case, knob in (
                ("decode", "rpa_v3.d_block_sizes"),
                ("prefill", "rpa_v3.p_block_sizes"),
                ("mixed", "rpa_v3.m_block_sizes"),
            ):
                want = up_rpa_v3(version, q_dtype, kv_dtype, q, kv, hd, page, tokens, pages, case)
                got = k[knob]
                if up_vmem(kv_dtype, q, kv, hd, want[0], want[1], q_dtype) <= limit:
                    assert got == want, (gid, w, case)
                    continue
                # Upstream's default needs more VMEM than its limit, by upstream's own
                # estimate: the baseline shrinks it to fit, as a valid explicit tuple.
                shrunk += 1
                assert up_vmem(kv_dtype, q, kv, hd, got[0], got[1], q_dtype) <= limit, (gid, w)
                assert got[0] <= want[0] and got[1] <= want[1], (gid, w, case)
                assert got[0] % got[2] == 0 and got[1] % got[3] == 0, (gid, w, case)
                assert got[1] % page == 0 and got[3] % page == 0, (gid, w, case)
            # upstream: get_tpu_info().vmem_capacity_bytes
            assert k["rpa_v3.vmem_limit_bytes"] == JAX_VMEM[gid]
        if "rpa_v2" in spec.kernels.families:
            heads = up_min_heads_per_blk(q, 2 * kv, q_dtype, kv_dtype)
            if heads is None:  # upstream raises "can not be XLA fully tiled"
                assert "rpa_v2.num_kv_pages_per_block" not in k
            else:
                want = up_rpa_v2(
                    version,
                    q_dtype,
                    kv_dtype,
                    heads[0],
                    heads[1] // 2,
                    align_to(hd, 128),
                    page,
                    tokens,
                    pages,
                )
                assert (
                    k["rpa_v2.num_kv_pages_per_block"],
                    k["rpa_v2.num_queries_per_block"],
                ) == want, (gid, w)
                # torch_xla passes 120 MiB; on cores with less VMEM (v4 16 MiB, v5p 64 MiB) we
                # cap it at the core's VMEM: a limit above the hardware cannot be honoured.
                assert k["rpa_v2.vmem_limit_bytes"] == min(120 * MIB, JAX_VMEM[gid])
        checked += 1
    assert checked + refused == len(GRID) >= 12000
    assert refused < len(GRID) // 20
    assert shrunk < checked * 3  # most tuples are upstream's own defaults
    if "rpa_v3" in spec.kernels.families:
        assert no_v3 >= 500  # the int8 rows were checked, not skipped


def test_user_fixed_page_size_is_kept(cat):
    w = Workload(32, 8, 128, max_model_len=4096, page_size=32)
    cfg = resolve(w, simulate="v6e")
    assert cfg.value("page_size") == 32 and cfg.layer("page_size") == "workload"
    assert cfg.value("rpa_v3.p_block_sizes")[1] % 32 == 0


def test_seed_choices_are_outside_the_baseline(cat):
    """The seed padded head dim 128 to 256 on v6e and set a 768 KiB VMEM limit."""
    seed_vmem = 768 * 1024
    for gid in ("v4", "v5e", "v5p", "v6e", "tpu7x"):
        for hd in (64, 128, 192, 256):
            k = _knobs(cat[gid], Workload(32, 8, hd))
            assert k["head_dim_padded"] == cdiv(hd, 128) * 128
            for name, value in k.items():
                if name.endswith("vmem_limit_bytes"):
                    assert value >= 16 * MIB and value != seed_vmem
    assert _knobs(cat["v6e"], Workload(32, 8, 128))["head_dim_padded"] == 128  # the seed: 256


def test_resolve_refuses_a_vmem_limit_above_the_core(tmp_path):
    f = tmp_path / "overrides.toml"
    f.write_text(
        'schema_version = 1\n[[override]]\ngeneration = "v6e"\n'
        'knobs = { "rpa_v3.vmem_limit_bytes" = 268435456 }\n'
    )
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 128), simulate="v6e", overrides=f)
    # Checked against the generation the entry names, with the file and line, before any
    # workload is known: `validate` says the same.
    assert str(e.value) == (
        f"{f}:4: override[0].knobs.rpa_v3.vmem_limit_bytes: rpa_v3.vmem_limit_bytes 268435456 "
        "is above the v6e core VMEM of 134217728 bytes (128 MiB) [rule vmem_within_core] "
        "(use at most 134217728)"
    )
    f.write_text(  # for every generation: only the kernel rule can say, once it applies
        'schema_version = 1\n[[override]]\ngeneration = "*"\n'
        'knobs = { "rpa_v3.vmem_limit_bytes" = 268435456 }\n'
    )
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 128), simulate="v6e", overrides=f)
    assert str(e.value) == (
        "layer overrides: rpa_v3.vmem_limit_bytes: rpa_v3.vmem_limit_bytes 268435456 "
        "is above the v6e core VMEM of 134217728 bytes (128 MiB) [rule vmem_within_core] "
        "(use at most 134217728)"
    )


def test_cli_refuses_a_vmem_limit_above_the_core(tmp_path):
    f = tmp_path / "overrides.toml"
    f.write_text(
        'schema_version = 1\n[[override]]\ngeneration = "*"\n'
        'knobs = { "rpa_v3.vmem_limit_bytes" = 268435456 }\n'
    )
    r = run_cli(
        "resolve",
        "--simulate",
        "v6e",
        *SHAPE,
        "--overrides",
        str(f),
    )
    assert (
        r.returncode == 2 and "above the v6e core VMEM" in r.stderr and "Traceback" not in r.stderr
    )


def test_llama_8b_kv_bytes_on_v6e_equal_upstream_layout():
    cfg = resolve(Workload.from_hf_config(REPO / "examples" / "llama-3.1-8b.json"), simulate="v6e")
    p = plan(cfg)
    assert p.head_dim_padded == 128
    for layout in ("vllm_pallas", "tpu_inference"):
        # upstream: 2 (K and V) x 8 KV heads x 128 x 2 bytes
        assert p.kv_bytes_per_token(layout) == 2 * 8 * 128 * 2 == 4096
        assert p.kv_bytes_per_token(layout, num_layers=32) == 131072
    assert p.kv_cache_shape("vllm_pallas", 10) == (10, cfg.value("page_size"), 16, 128)
    assert p.kv_cache_shape("tpu_inference", 10) == (10, cfg.value("page_size"), 8, 2, 128)
    # fp8 packs four per 32-bit word in tpu-inference's layout
    assert kv_bytes_per_token("tpu_inference", 8, 128, "float8_e4m3fn") == 2048
    assert p.tokens_in_budget("tpu_inference", 1 << 30, num_layers=32) == 8192


# ---------------------------------------------------------------------------------------------
# Property: for any valid workload and generation, the knobs satisfy the kernels' constraints.
# ---------------------------------------------------------------------------------------------

workloads = st.builds(
    lambda kv, group, hd, kv_dtype, L, seqs, tokens, tp: Workload(
        kv * group,
        kv,
        hd,
        kv_dtype=kv_dtype,
        max_model_len=L,
        max_num_seqs=seqs,
        max_num_batched_tokens=tokens,
        tensor_parallel=tp if (kv * group) % tp == 0 else 1,
    ),
    kv=st.sampled_from([1, 2, 4, 8, 16]),
    group=st.sampled_from([1, 2, 4, 5, 7, 8]),
    hd=st.sampled_from([64, 80, 96, 128, 192, 256]),
    kv_dtype=st.sampled_from(["bf16", "fp8", "fp8_e5m2", "int8"]),
    L=st.integers(16, 262144),
    seqs=st.integers(1, 4096),
    tokens=st.integers(16, 65536),
    tp=st.sampled_from([1, 2, 4, 8]),
)


@settings(
    max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(w=workloads, gid=st.sampled_from(["v4", "v5e", "v5p", "v6e", "tpu7x", "tpu8t", "tpu8i"]))
def test_knobs_satisfy_kernel_constraints(w, gid):
    spec = load_catalog()[gid]
    try:
        k = _knobs(spec, w)
    except TuningError as e:  # upstream's kernel cannot run it either: refused, saying why
        assert "bytes of VMEM for one page of" in str(e) or "leave no SMEM" in str(e), e
        return
    assert check_constraints(spec, w, k, defaults=frozenset(k)) == []
    page = k["page_size"]
    assert page > 0 and page & (page - 1) == 0
    pages = cdiv(w.max_model_len, page)
    if "rpa_v2.num_kv_pages_per_block" in k:
        assert 0 < k["rpa_v2.num_kv_pages_per_block"] <= pages
        assert 0 < k["rpa_v2.num_queries_per_block"] <= w.max_num_batched_tokens
    for name in ("rpa_v3.d_block_sizes", "rpa_v3.p_block_sizes", "rpa_v3.m_block_sizes"):
        if name in k:
            assert min(k[name]) > 0 and k[name][1] <= pages * page
    for name, v in k.items():
        if name.endswith("vmem_limit_bytes"):
            assert 0 < v <= spec.chip.vmem_bytes_per_core


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def test_workload_from_hf_config(tmp_path):
    w = Workload.from_hf_config(REPO / "examples" / "llama-3.1-8b.json", max_model_len=4096)
    assert (w.num_q_heads, w.num_kv_heads, w.head_dim, w.max_model_len) == (32, 8, 128, 4096)
    f = tmp_path / "config.json"
    f.write_text(
        json.dumps(
            {
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 256,
                "hidden_size": 3584,
                "sliding_window": 4096,
            }
        )
    )
    w = Workload.from_hf_config(f)
    assert (w.head_dim, w.sliding_window) == (256, 4096)
    f.write_text(json.dumps({"num_attention_heads": 32, "hidden_size": 4096}))
    assert Workload.from_hf_config(f).num_kv_heads == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_q_heads": 32, "num_kv_heads": 6, "head_dim": 128},
            "workload: num_kv_heads: 6 KV heads do not divide 32 query heads "
            "(grouped-query attention needs q heads = k x kv heads)",
        ),
        (
            {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 0},
            "workload: head_dim: must be a positive whole number, got 0 (check the model config)",
        ),
        (
            {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "kv_dtype": "fp4"},
            "workload: kv_dtype: unknown dtype 'fp4' (use one of: bfloat16, float16, float32, "
            "float8_e4m3fn, float8_e5m2, int8, or bf16, fp8, fp8_e5m2, int8)",
        ),
        (
            {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "page_size": 48},
            "workload: page_size: must be a power of two, got 48 (use 16, 32, 64, 128 or 256)",
        ),
        (
            {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "tensor_parallel": 3},
            "workload: tensor_parallel: 3-way tensor parallelism does not divide 32 query heads "
            "(use a tensor-parallel degree that divides the heads)",
        ),
    ],
)
def test_invalid_workloads_get_clear_errors(kwargs, message):
    with pytest.raises(TuningError) as e:
        Workload(**kwargs)
    assert str(e.value) == message


def test_workload_from_dict_rejects_unknown_fields():
    with pytest.raises(TuningError, match="workload: heads: unknown workload field"):
        Workload.from_dict({"heads": 32, "num_kv_heads": 8, "head_dim": 128})


def test_too_many_sequences_for_smem():
    with pytest.raises(
        TuningError, match="max_num_seqs: 200000 sequences leave no SMEM for block tables on v6e"
    ):
        resolve(Workload(32, 8, 128, max_num_seqs=200000), simulate="v6e")


# ---------------------------------------------------------------------------------------------
# Tables, overrides, plugins, provenance
# ---------------------------------------------------------------------------------------------


def test_tables_apply_on_a_hit_and_record_provenance():
    # A row of torch_xla's 'TPU v6' table:
    # ('bfloat16','bfloat16', 12, 2, 128, 128, 1024, 2048) -> (16, 32)
    cfg = resolve(
        Workload(12, 2, 128, max_model_len=2048, max_num_batched_tokens=1024, page_size=128),
        simulate="v6e",
    )
    assert (
        cfg.value("rpa_v2.num_kv_pages_per_block"),
        cfg.value("rpa_v2.num_queries_per_block"),
    ) == (16, 32)
    assert cfg.layer("rpa_v2.num_kv_pages_per_block") == "tables"
    assert cfg.knobs["rpa_v2.num_kv_pages_per_block"].overrode == (("baseline", 16),)
    # v5e and v5p share upstream's 'TPU v5' table
    t = {tuple(t.table.generations) for t in load_tables(table_folders({}))}
    assert ("v5e", "v5p") in t and ("v6e",) in t


# torch_xla 2.9 ragged_paged_attention_v2: TUNED_BLOCK_SIZES as the importer wrote it to
# hardware/tuning/ (read here as plain TOML), looked up as simplify_key/get_tuned_block_sizes
# do. Transcribed from the torch_xla source, independent of tpu_registry.policies.tables.
def _upstream_tables():
    out = {}
    for path in sorted((HARDWARE / "tuning").glob("rpa_v2_*.toml")):
        doc = tomllib.loads(path.read_text())
        assert doc["kernel"] == "rpa_v2" and len(doc["key"]) == 8, path
        rows = {tuple(r[:8]): tuple(r[8:]) for r in doc["rows"]}
        for gid in doc["generations"]:
            out[gid] = rows
    return out


UPSTREAM_TABLES = _upstream_tables()


def up_simplify_key(key):
    (q_dtype, kv_dtype, q_blk, kv_blk, head_dim, page_size, max_tokens, pages_per_seq) = key
    return (
        q_dtype,
        kv_dtype,
        q_blk,
        kv_blk,
        (head_dim + 127) // 128 * 128,
        pow2(page_size),
        pow2(max_tokens),
        page_size * pages_per_seq,
    )


def up_tuned_block_sizes(gid, q_dtype, kv_dtype, q_blk, kv_blk, head_dim, page, tokens, pages):
    """get_tuned_block_sizes' table branch: the hit, clamped; None on a miss (upstream then
    keeps its defaults, which the baseline gives)."""
    key = up_simplify_key((q_dtype, kv_dtype, q_blk, kv_blk, head_dim, page, tokens, pages))
    hit = UPSTREAM_TABLES[gid].get(key)
    if hit is None:
        return None
    bkv, bq = hit
    return min(pages, bkv), min(tokens, bq)


def _table_workload(rng):
    """A workload near a table row, every keyed figure un-rounded (tokens anywhere in the
    power-of-two bucket, model length anywhere in the last page, head dim below 128), with
    tensor parallelism; or, one time in four, a random one."""
    gid = rng.choice(["v5e", "v5p", "v6e"])
    tp = rng.choice([1, 2, 4, 8])
    seqs = rng.choice([8, 64, 256])
    if rng.random() < 0.25:
        kv_dev = rng.choice([1, 2, 4, 8])
        q_dev = kv_dev * rng.choice([1, 2, 3, 4, 6, 8])
        tokens = rng.randint(1, 4096)
        max_tokens = rng.randint(tokens, 8192)
        L = rng.randint(16, 4096)
        page = rng.choice([None, 16, 32, 64])
        page = page if page is None or page <= pow2(L) else None
        hd = rng.choice([64, 80, 128, 200, 256])
    else:
        row = rng.choice(sorted(UPSTREAM_TABLES[gid]))
        q_dev, kv_dev, hd_r, page, tok_r, len_r = row[2:8]
        hd = rng.randint(hd_r - 127, hd_r)
        tokens = rng.randint(tok_r // 2 + 1, tok_r)
        max_tokens = rng.choice([tokens, rng.randint(tokens, 8192)])
        L = rng.randint(len_r - page + 1, len_r)
        if page > pow2(L):
            L = len_r
        page = page if rng.random() < 0.85 else None
    q_all, kv_all = q_dev * tp, kv_dev * tp
    if kv_dev == 1 and tp > 1 and rng.random() < 0.5:  # fewer KV heads than devices
        kv_all = rng.choice([d for d in range(1, tp) if q_all % d == 0])
    w = Workload(
        q_all,
        kv_all,
        hd,
        max_model_len=L,
        max_num_seqs=seqs,
        max_num_batched_tokens=max_tokens,
        num_tokens=tokens if tokens != max_tokens else None,
        page_size=page,
        tensor_parallel=tp,
    )
    return gid, w


def test_tables_agree_with_torch_xla_lookup_on_unrounded_workloads():
    """The tables policy against torch_xla's own bucketing (simplify_key) and lookup
    (get_tuned_block_sizes), on random workloads whose tokens, model lengths and head dims
    are not the table's rounded keys, with tensor parallelism."""
    rng = random.Random(1717)
    hits = misses = 0
    for _ in range(400):
        gid, w = _table_workload(rng)
        q, kv = up_heads_per_device(w.num_q_heads, w.num_kv_heads, w.tensor_parallel)
        L, seqs = w.max_model_len, w.max_num_seqs
        page = w.page_size or max(up_page_size(L), up_min_page_size(L, seqs))
        tokens = w.num_tokens or w.max_num_batched_tokens
        heads = up_min_heads_per_blk(q, 2 * kv, "bfloat16", "bfloat16")
        want = None
        if heads is not None:
            q_blk, kv_blk = heads[0], heads[1] // 2
            key = ("bfloat16", "bfloat16", q_blk, kv_blk, w.head_dim, page, tokens, cdiv(L, page))
            want = up_tuned_block_sizes(gid, *key)
        cfg = resolve(w, simulate=gid)
        got = (
            cfg.value("rpa_v2.num_kv_pages_per_block"),
            cfg.value("rpa_v2.num_queries_per_block"),
        )
        layers = {cfg.layer(n) for n in ("rpa_v2.num_kv_pages_per_block",)}
        if want is None:
            misses += 1
            assert "tables" not in cfg.tuning.layers, (gid, w)
        else:
            hits += 1
            assert (got, layers) == (want, {"tables"}), (gid, w)
    assert hits >= 200 and misses >= 50, (hits, misses)


def test_every_imported_table_row_is_reachable():
    """Each row's key is what bucket() computes for some workload, so none is dead weight."""
    from tpu_registry.policies.tables import lookup

    tables = [t for t in load_tables(table_folders({})) if t.table.kernel == "rpa_v2"]
    for t in tables:
        for row in t.table.rows:
            qd, kvd, qh, kvh, hd, page, tokens, model_len = row[:8]
            w = Workload(
                qh,
                kvh,
                hd,
                q_dtype=qd,
                kv_dtype=kvd,
                max_model_len=model_len,
                max_num_batched_tokens=tokens,
                page_size=page,
            )
            knobs, used = lookup(t.table.generations[0], "rpa_v2", w, page, [t])
            assert knobs == {
                "rpa_v2.num_kv_pages_per_block": row[8],
                "rpa_v2.num_queries_per_block": row[9],
            }, row
    assert sum(len(t.table.rows) for t in tables) == 1336


def test_every_hd64_table_row_is_reachable():
    """Each row of the imported head-dim-64 tables is hit by a workload built from its key
    (heads chosen so that upstream's get_simplified_raw_key gives the row's counts)."""
    from tpu_registry.policies.tables import lookup

    tables = [t for t in load_tables(table_folders({})) if t.table.kernel == "rpa_v3_hd64"]
    assert {g for t in tables for g in t.table.generations} == {"v5e", "v6e", "tpu7x"}
    for t in tables:
        for row in t.table.rows:
            page, qd, kvd, qh, kvh, model_len, sw, bkv_p, bq = row
            w = Workload(
                qh,
                kvh,
                64,
                q_dtype=qd,
                kv_dtype=kvd,
                max_model_len=model_len,
                max_num_batched_tokens=8192,
                page_size=page,
                sliding_window=sw or None,
            )
            knobs, _ = lookup(t.table.generations[0], "rpa_v3_hd64", w, page, [t])
            assert knobs == {
                "rpa_v3_hd64.num_kv_pages_per_block": bkv_p,
                "rpa_v3_hd64.num_queries_per_block": bq,
            }, row
    assert sum(len(t.table.rows) for t in tables) == 312


def test_mla_table_rows_are_reachable_but_the_swapped_ones():
    """Each MLA row whose kv_packing is the catalog's (tpu-inference's MLA_KV_PACKING_SIZE
    default, 32) is hit by the workload of its key. Upstream also keys 9 rows by TuningKey's
    own defaults (kv_packing 4, 256 rows per page: a cache packed as DeepSeek V4's manager
    sets MLA_KV_PACKING_SIZE=4) and 11 rows by kv_packing 1024 with 576 rows per page (the
    page size and latent width, apparently swapped), which no default cache meets; they are
    kept, as upstream keeps them, and counted here."""
    from tpu_registry.policies.tables import lookup

    spec = load_catalog()["v6e"]
    pack = spec.kernels.mla_v2.kv_packing
    tables = [t for t in load_tables(table_folders({})) if t.table.kernel == "mla_v2"]
    reachable, unreachable = 0, Counter()
    for t in tables:
        n = len(t.table.key)
        for row in t.table.rows:
            tokens, heads, lkv, rope, kvd, qd, rows_per_page, row_pack, seqs, pps = row[:n]
            if row_pack != pack:
                unreachable[row_pack, rows_per_page] += 1
                continue
            page = rows_per_page * pack
            w = Workload(
                heads,
                1,
                lkv + rope,
                kv_lora_rank=lkv,
                qk_rope_head_dim=rope,
                q_dtype=qd,
                kv_dtype=kvd,
                max_model_len=pps * page,
                max_num_seqs=seqs,
                max_num_batched_tokens=tokens,
                page_size=page,
            )
            knobs, _ = lookup("v6e", "mla_v2", w, page, [t], pack)
            assert knobs == {
                f"mla_v2.{name}": v for name, v in zip(t.table.value, row[n:], strict=True)
            }, row
            reachable += 1
    assert reachable == 39 and unreachable == {(4, 256): 9, (1024, 576): 11}


def test_overrides_per_generation_and_workload_match(tmp_path):
    f = tmp_path / "ov.toml"
    f.write_text("""schema_version = 1

[[override]]
generation = "TPU v6 lite"
match = { max_model_len = 4096 }
note = "measured"
[override.knobs]
page_size = 64
"rpa_v3.d_block_sizes" = [1, 512, 1, 512]

[[override]]
generation = "*"
knobs = { head_dim_padded = 256 }
""")
    f.chmod(0o644)
    cfg = resolve(Workload(32, 8, 128, max_model_len=4096), simulate="v6e", overrides=f)
    assert (cfg.value("page_size"), cfg.layer("page_size")) == (64, "overrides")
    assert cfg.value("rpa_v3.d_block_sizes") == (1, 512, 1, 512)
    assert cfg.value("head_dim_padded") == 256 and cfg.layer("head_dim_padded") == "overrides"
    assert cfg.knobs["page_size"].overrode == (("baseline", 256),)
    # block sizes are recomputed for the overridden page size, and say so
    assert cfg.value("rpa_v3.p_block_sizes")[1] % 64 == 0
    assert cfg.knobs["rpa_v3.p_block_sizes"].derived_from == (("page_size", "overrides"),)
    other = resolve(Workload(32, 8, 128, max_model_len=2048), simulate="v6e", overrides=f)
    assert other.layer("page_size") == "baseline" and other.value("head_dim_padded") == 256
    v5e = resolve(Workload(32, 8, 128, max_model_len=4096), simulate="v5e", overrides=f)
    assert v5e.layer("page_size") == "baseline"


def test_overrides_first_matching_entry_wins_for_the_same_knob(tmp_path):
    """Entries that overlap and set the same knobs: the first matching one wins, whatever the
    values; an entry that does not match gives way to the next."""
    specific = (
        '[[override]]\ngeneration = "v6e"\nmatch = { max_model_len = 4096 }\n'
        'knobs = { page_size = 64, "rpa_v3.d_block_sizes" = [1, 512, 1, 512] }\n'
    )
    general = (
        '[[override]]\ngeneration = "*"\n'
        'knobs = { page_size = 32, "rpa_v3.d_block_sizes" = [1, 1024, 1, 1024] }\n'
    )
    w = Workload(32, 8, 128, max_model_len=4096)
    got = {}
    for name, entries in {
        "specific_first": (specific, general),
        "general_first": (general, specific),
        "first_does_not_match": (specific.replace("4096", "2048"), general),
    }.items():
        f = tmp_path / f"{name}.toml"
        f.write_text("schema_version = 1\n" + "".join(entries))
        cfg = resolve(w, simulate="v6e", overrides=f)
        assert cfg.layer("page_size") == cfg.layer("rpa_v3.d_block_sizes") == "overrides"
        got[name] = (cfg.value("page_size"), cfg.value("rpa_v3.d_block_sizes"))
    assert got == {
        "specific_first": (64, (1, 512, 1, 512)),
        "general_first": (32, (1, 1024, 1, 1024)),
        "first_does_not_match": (32, (1, 1024, 1, 1024)),
    }


def test_overrides_file_errors_name_file_line_and_field(tmp_path, monkeypatch):
    f = tmp_path / "ov.toml"
    f.write_text(
        'schema_version = 1\n[[override]]\ngeneration = "v6e"\nknobs = { pagesize = 64 }\n'
    )
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 128), simulate="v6e", overrides=f)
    assert str(e.value) == (
        f"{f}:4: override[0].knobs.pagesize: unknown knob 'pagesize' (did you mean 'page_size'?)"
    )
    f.write_text(
        'schema_version = 1\n[[override]]\ngeneration = "v42"\nknobs = { page_size = 64 }\n'
    )
    monkeypatch.setenv("TPU_REGISTRY_OVERRIDES", str(f))
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 128), simulate="v6e")
    assert str(e.value) == (
        f"{f}:3: override[0].generation: 'v42' names no generation "
        '(use an id from `tpu-registry list`, or "*")'
    )


def test_policies_env_selects_active_policies(monkeypatch):
    w = Workload(12, 2, 128, max_model_len=2048, max_num_batched_tokens=1024, page_size=128)
    monkeypatch.setenv("TPU_REGISTRY_POLICIES", "baseline")
    assert resolve(w, simulate="v6e").layer("rpa_v2.num_kv_pages_per_block") == "baseline"
    monkeypatch.setenv("TPU_REGISTRY_POLICIES", "baseline,nope")
    with pytest.raises(TuningError, match="TPU_REGISTRY_POLICIES names unknown policies: nope"):
        resolve(w, simulate="v6e")


def test_contributing_tuning_policy_walkthrough(tmp_path):
    """CONTRIBUTING.md 'Write a tuning policy': the policy as written wins with its name."""
    doc = (REPO / "CONTRIBUTING.md").read_text()
    section = doc.split("<!-- section: tuning-policy -->")[1].split("<!-- end: tuning-policy -->")[
        0
    ]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    (tmp_path / "my_policy.py").write_text(code)
    spec = importlib.util.spec_from_file_location("my_policy", tmp_path / "my_policy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pm = get_plugin_manager()
    pm.register(mod, name="my_policy")
    try:
        cfg = resolve(Workload(32, 8, 128, max_model_len=32768), simulate="v6e")
        assert (cfg.value("page_size"), cfg.layer("page_size")) == (128, "my-policy")
        assert cfg.value("rpa_v3.p_block_sizes")[1] % 128 == 0
        assert cfg.knobs["max_num_seqs_smem"].derived_from == (("page_size", "my-policy"),)
        assert (
            resolve(Workload(32, 8, 128, max_model_len=32768), simulate="v5e").layer("page_size")
            == "baseline"
        )
    finally:
        pm.unregister(name="my_policy")


def test_plugin_layer_order_tryfirst_trylast():
    import tpu_registry
    from tpu_registry import Layer

    class Plain:
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            return Layer("plain", {"page_size": 32, "head_dim_padded": 256})

    class Last:
        @tpu_registry.hookimpl(trylast=True)
        def tpu_registry_tune(self, spec, workload, detection):
            return Layer("last", {"page_size": 64})

    pm = get_plugin_manager()
    pm.register(Plain(), name="plain")
    pm.register(Last(), name="last")
    try:
        cfg = resolve(Workload(32, 8, 128), simulate="v6e")
        # pluggy calls trylast implementations after the built-in baseline: such a layer only
        # fills knobs nobody else set (here none: the baseline sets them all).
        assert cfg.tuning.layers == ("plain", "baseline", "last")
        knob_layers = {k.layer for k in cfg.knobs.values()}
        assert cfg.layer("page_size") == "plain" and "last" not in knob_layers
        assert cfg.knobs["page_size"].overrode == (("baseline", 128), ("last", 64))
    finally:
        pm.unregister(name="plain")
        pm.unregister(name="last")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_resolve_table_json_explain_and_vllm():
    args = [
        "resolve",
        "--simulate",
        "v6e",
        *SHAPE,
        "--max-model-len",
        "4096",
    ]
    r = run_cli(*args)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0] == "v6e (TPU v6e (Trillium)): simulated: simulated via --simulate"
    assert ["page_size", "256", "baseline"] in [line.split() for line in lines]
    d = json.loads(run_cli(*args, "--json").stdout)
    assert d["knobs"]["page_size"] == {"value": 256, "layer": "baseline", "overrode": []}
    assert d["plan"]["kernel_kwargs"]["rpa_v3"]["vmem_limit_bytes"] == 128 * MIB
    ex = run_cli(*args, "--explain").stdout
    assert (
        "why: simulated: simulated via --simulate" in ex
        and "layers (most trusted first): baseline" in ex
    )
    vl = run_cli(*args, "--format", "vllm").stdout.splitlines()
    assert vl[1] == "--block-size 256"
    assert vl[2].startswith("export RPA_V3_DECODE_BLOCK_SIZES=1,")


def test_cli_resolve_needs_a_shape_and_a_tpu():
    r = run_cli("resolve", "--simulate", "v6e")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: give the attention shape: --hf-config PATH, or --heads N --kv-heads N --head-dim N"
    )
    r = run_cli("resolve", "--heads", "32", "--kv-heads", "8", "--head-dim", "128")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: detection: cannot resolve: no TPU was found: no TPU evidence found "
        "(say which generation with --simulate ID or TPU_REGISTRY_GENERATION=ID)"
    )


def test_resolved_config_is_frozen_and_serialisable():
    cfg = resolve(Workload(32, 8, 128), simulate="tpu7x")
    with pytest.raises(AttributeError):
        cfg.spec = None
    d = cfg.to_dict()
    assert d["generation"] == "tpu7x" and "rpa_v2.num_kv_pages_per_block" not in d["knobs"]
    assert json.loads(json.dumps(d))["knobs"]["rpa_v3.vmem_limit_bytes"]["value"] == 64 * MIB


def test_generations_without_a_kernel_get_common_knobs_only():
    cfg = resolve(Workload(32, 8, 128), simulate="v3")
    assert set(cfg.knobs) == {
        "head_dim_padded",
        "page_size",
        "min_page_size",
        "max_num_seqs_smem",
        "vmem_limit_bytes",
    }
    assert any("no paged-attention kernel supports v3" in n for n in cfg.notes)


def test_detection_object_reaches_policies():
    seen = []
    import tpu_registry

    class Spy:
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            seen.append((spec.id, detection.status))

    pm = get_plugin_manager()
    pm.register(Spy(), name="spy")
    try:
        resolve(Workload(32, 8, 128), simulate="v5p")
    finally:
        pm.unregister(name="spy")
    assert seen == [("v5p", "simulated")]  # one policy run: the baseline's page was kept
    assert reconcile(load_catalog(), []).status == "none"


def test_cli_vllm_format_leaves_unset_what_the_kernel_would_reject():
    """tpu-inference checks explicit RPA v3 tuples (bq_sz % bq_csz, bkv_sz % bkv_csz) but not
    its own per-call defaults; a default that fails the check is left to the kernel."""
    r = run_cli(
        "resolve",
        "--simulate",
        "v6e",
        *SHAPE,
        "--max-num-batched-tokens",
        "64",
        "--format",
        "vllm",
    )
    lines = r.stdout.splitlines()
    assert "export RPA_V3_DECODE_BLOCK_SIZES=1,2048,1,2048" in lines
    assert (
        "# RPA_V3_PREFILL_BLOCK_SIZES left unset: bq_sz 32 is not a multiple of bq_csz 64; "
        "the kernel's own default applies" in lines
    )


def test_head_dim_64_uses_the_hd64_layout_in_tpu_inference():
    """tpu-inference runs head dim 64 on its hd64 kernel: K and V share the 128 lanes, so
    nothing is padded (Llama-3.2-1B); vLLM 0.13's Pallas layout pads 64 to 128."""
    assert kv_bytes_per_token("tpu_inference", 8, 64, "bfloat16") == 8 * 128 * 2 == 2048
    assert kv_bytes_per_token("vllm_pallas", 8, 64, "bfloat16") == 2 * 8 * 128 * 2 == 4096
    from tpu_registry.attention import kv_cache_shape

    assert kv_cache_shape("tpu_inference", 4, 16, 8, 64, "bfloat16") == (4, 16, 4, 2, 128)
    assert kv_cache_shape("tpu_inference", 4, 16, 1, 64, "float8_e4m3fn") == (4, 16, 1, 4, 128)


def test_every_table_key_column_is_documented():
    """docs/tables.md explains how each key column buckets a workload."""
    from typing import get_args

    from tpu_registry.policies.tables import KeyColumn

    doc = (REPO / "docs" / "tables.md").read_text()
    missing = [c for c in get_args(KeyColumn) if f"`{c}`" not in doc]
    assert not missing, missing


# ------------------------------------------------------------ overrides: one case per rule


def _overrides_file(tmp_path, body: str, name: str = "ov.toml"):
    f = tmp_path / name
    f.write_text("schema_version = 1\n" + body)
    f.chmod(0o644)
    return f


@pytest.mark.parametrize(
    "entry, expected",
    [
        (
            "match = { bogus = 1, other = 2 }\nknobs = { page_size = 64 }\n",
            "override[0].match.bogus: match names unknown workload fields: bogus, other "
            "(known: " + ", ".join(f.name for f in fields(Workload)) + ")",
        ),
        (
            'match = { kv_dtype = "float9" }\nknobs = { page_size = 64 }\n',
            "override[0].match.kv_dtype: match kv_dtype 'float9' is not a dtype (use one of: "
            "bfloat16, float16, float32, float8_e4m3fn, float8_e5m2, int8)",
        ),
        (
            'match = { max_model_len = "4096" }\nknobs = { page_size = 64 }\n',
            "override[0].match.max_model_len: match max_model_len must be a whole number, got "
            "'4096' (write the number without quotes)",
        ),
        (
            "[override.knobs.rpa_v3]\n",
            "override[0].knobs.rpa_v3: rpa_v3 is a table; knob names are flat "
            '(write "rpa_v3.name" = ... (quoted: an unquoted dotted key makes a table))',
        ),
    ],
    ids=["unknown-fields", "unknown-dtype", "quoted-number", "empty-table"],
)
def test_overrides_entry_errors_are_exact(tmp_path, entry, expected):
    f = _overrides_file(tmp_path, f'[[override]]\ngeneration = "v6e"\n{entry}')
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 128), simulate="v6e", overrides=f)
    (problem,) = e.value.problems
    assert str(problem).split(": ", 1)[1] == expected, str(problem)


def test_overrides_match_a_dtype_by_any_of_its_names(tmp_path):
    """``match = { kv_dtype = "fp8" }`` is float8_e4m3fn, however the workload spells it."""
    f = _overrides_file(
        tmp_path,
        '[[override]]\ngeneration = "v6e"\nmatch = { kv_dtype = "fp8" }\n'
        "knobs = { head_dim_padded = 256 }\n",
    )
    for kv, layer in (("float8_e4m3fn", "overrides"), ("fp8", "overrides"), ("bf16", "baseline")):
        cfg = resolve(Workload(32, 8, 128, kv_dtype=kv), simulate="v6e", overrides=f)
        assert cfg.layer("head_dim_padded") == layer, kv


def test_overrides_vmem_check_per_generation_is_a_strict_bound(tmp_path):
    """A VMEM limit equal to the core's is allowed; a "*" entry before an entry that names a
    generation does not stop that entry from being checked."""
    core = 128 * MIB  # v6e
    ok = _overrides_file(
        tmp_path,
        f'[[override]]\ngeneration = "v6e"\nknobs = {{ "rpa_v3.vmem_limit_bytes" = {core} }}\n',
    )
    cfg = resolve(Workload(32, 8, 128), simulate="v6e", overrides=ok)
    assert (cfg.value("rpa_v3.vmem_limit_bytes"), cfg.layer("rpa_v3.vmem_limit_bytes")) == (
        core,
        "overrides",
    )
    bad = _overrides_file(
        tmp_path,
        '[[override]]\ngeneration = "*"\nknobs = { head_dim_padded = 256 }\n'
        f'[[override]]\ngeneration = "v6e"\nknobs = {{ vmem_limit_bytes = {core + 1} }}\n',
        name="bad.toml",
    )
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 128), simulate="v6e", overrides=bad)
    assert str(e.value) == (
        f"{bad}:7: override[1].knobs.vmem_limit_bytes: vmem_limit_bytes {core + 1} is above the "
        f"v6e core VMEM of {core} bytes (128 MiB) [rule vmem_within_core] (use at most {core})"
    )


def test_overrides_files_alike_in_size_and_time_are_read_apart(tmp_path):
    """The parse cache is keyed by path: two files of equal size, mtime and mode are two
    files."""
    a = _overrides_file(
        tmp_path, '[[override]]\ngeneration = "v6e"\nknobs = { page_size = 64 }\n', "a.toml"
    )
    b = _overrides_file(
        tmp_path, '[[override]]\ngeneration = "v6e"\nknobs = { page_size = 32 }\n', "b.toml"
    )
    stamp = a.stat().st_mtime_ns
    os.utime(b, ns=(stamp, stamp))
    w = Workload(32, 8, 128)
    assert resolve(w, simulate="v6e", overrides=a).value("page_size") == 64
    assert resolve(w, simulate="v6e", overrides=b).value("page_size") == 32


def test_a_file_that_cannot_be_read_is_not_called_writable(tmp_path):
    assert overrides_policy.writable_by_others(tmp_path / "missing.toml") is False


# ------------------------------------------------------------------ merge: blame and faults


def test_a_rule_broken_by_two_user_layers_blames_the_more_trusted(tmp_path):
    """The user's fixed page (the workload layer, first) and an override that does not fit it:
    the error names the workload layer, with the default hint of a rule that has none."""
    f = _overrides_file(
        tmp_path,
        '[[override]]\ngeneration = "v6e"\nknobs = { "rpa_v3.d_block_sizes" = [1, 96, 1, 96] }\n',
    )
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 128, page_size=64), simulate="v6e", overrides=f)
    assert str(e.value) == (
        "layer workload: rpa_v3.d_block_sizes: rpa_v3.d_block_sizes (1, 96, 1, 96): KV block "
        "sizes must be multiples of page_size 64 [rule rpa_v3_kv_page_multiple] (lower the "
        "value or remove the override)"
    )


def test_a_dropped_plugin_layer_names_every_rule_it_broke():
    import tpu_registry
    from tpu_registry import Layer

    class Bad:
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            knobs = {"rpa_v3.d_block_sizes": (1, 96, 1, 96), "rpa_v2.num_queries_per_block": 10**5}
            return Layer("bad", knobs)

    pm = get_plugin_manager()
    pm.register(Bad(), name="bad")
    try:
        cfg = resolve(Workload(32, 8, 128), simulate="v6e")
    finally:
        pm.unregister(name="bad")
    assert cfg.tuning.layers == ("baseline",)
    (fault,) = cfg.tuning.faults
    assert (fault.plugin, fault.stage) == ("bad", "tune")
    assert fault.message == (
        "knobs break kernel constraints, layer dropped: rpa_v2.num_queries_per_block 100000 must "
        "be in 1..2048 (max batched tokens); rpa_v3.d_block_sizes (1, 96, 1, 96): KV block sizes "
        "must be multiples of page_size 128"
    )


def test_overrides_entries_for_other_generations_are_theirs(tmp_path):
    """An entry for another generation neither applies nor is checked against this one's
    rules (a VMEM limit above v4's 16 MiB core is v4's business), and it does not hide the
    entries after it."""
    f = _overrides_file(
        tmp_path,
        '[[override]]\ngeneration = "v4"\nknobs = { vmem_limit_bytes = 67108864 }\n'
        '[[override]]\ngeneration = "v6e"\nknobs = { head_dim_padded = 256 }\n',
    )
    cfg = resolve(Workload(32, 8, 128), simulate="v6e", overrides=f)
    assert (cfg.value("head_dim_padded"), cfg.layer("head_dim_padded")) == (256, "overrides")
    assert cfg.layer("vmem_limit_bytes") == "baseline"
    with pytest.raises(TuningError, match=r"above the v4 core VMEM of 16777216 bytes"):
        resolve(Workload(32, 8, 128), simulate="v4", overrides=f)


def test_overrides_notes_are_shown_in_explain(tmp_path):
    """docs/overrides.md: an entry's ``note`` is shown in --explain, with the file it came
    from; only entries that set a knob are quoted, each once; a file writable by others says
    so there too."""
    f = _overrides_file(
        tmp_path,
        '[[override]]\ngeneration = "v6e"\nnote = "measured on our v6e-8 pool"\n'
        "knobs = { page_size = 64 }\n"
        '[[override]]\ngeneration = "*"\nnote = "measured on our v6e-8 pool"\n'
        "knobs = { head_dim_padded = 256 }\n"
        '[[override]]\ngeneration = "*"\nnote = "never used"\nknobs = { page_size = 32 }\n'
        '[[override]]\ngeneration = "v5e"\nnote = "for v5e"\nknobs = { page_size = 16 }\n',
    )
    cfg = resolve(Workload(32, 8, 128), simulate="v6e", overrides=f)
    assert cfg.notes == (f"overrides: from {f}; measured on our v6e-8 pool",)
    assert cfg.explain().endswith(f"\nnote: overrides: from {f}; measured on our v6e-8 pool")
    f.chmod(0o666)
    cfg = resolve(Workload(32, 8, 128, max_model_len=4096), simulate="v6e", overrides=f)
    assert cfg.notes == (
        f"overrides: from {f}; measured on our v6e-8 pool (warning: the file is writable by "
        "other users)",
    )


def test_policies_env_names_every_unknown_policy(monkeypatch):
    monkeypatch.setenv("TPU_REGISTRY_POLICIES", "bogus, tables,other")
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 128), simulate="v6e")
    assert str(e.value) == (
        "TPU_REGISTRY_POLICIES names unknown policies: bogus, other "
        "(known: baseline, overrides, tables)"
    )


def test_the_users_page_is_checked_with_everything_computed_for_it():
    """A page fixed by the user is not checked alone (as a plugin's page is): every rule it
    breaks, the v3 kernel's SMEM estimate for the block tables included, is reported; a page
    it may use is noted as the user's."""
    w = Workload(32, 8, 128, page_size=16, max_model_len=131072)
    with pytest.raises(TuningError) as e:
        resolve(w, simulate="v6e")
    assert [p.message.rsplit("[rule ", 1)[1] for p in e.value.problems] == [
        "page_smem_minimum]",
        "rpa_v3_smem_estimate]",
    ]
    assert {p.path for p in e.value.problems} == {"layer workload"}
    cfg = resolve(Workload(32, 8, 128, page_size=64), simulate="v6e")
    assert cfg.notes == ("workload: fixed by the user",)


def test_a_plugin_page_breaking_a_rule_drops_its_whole_layer():
    """A plugin's page that breaks a page rule drops that plugin's layer, for good: when a
    later plugin's page wins and the policies run again with it pinned, nothing of the dropped
    layer comes back."""
    import tpu_registry
    from tpu_registry import Layer

    class Good:
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            return Layer("good", {"page_size": 64})

    class Bad:
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            return Layer("bad", {"page_size": 4096, "head_dim_padded": 256})

    class Worse:  # breaks a rule only once the page is known: dropped in a later round
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            return Layer("worse", {"rpa_v2.num_queries_per_block": 10**5})

    pm = get_plugin_manager()
    pm.register(Good(), name="good")
    pm.register(Worse(), name="worse")
    pm.register(Bad(), name="bad")  # registered last: called first, the most trusted
    try:
        cfg = resolve(Workload(32, 8, 128), simulate="v6e")
    finally:
        for name in ("good", "worse", "bad"):
            pm.unregister(name=name)
    assert cfg.tuning.layers == ("good", "baseline")
    assert (cfg.value("page_size"), cfg.layer("page_size")) == (64, "good")
    assert (cfg.value("head_dim_padded"), cfg.layer("head_dim_padded")) == (128, "baseline")
    assert [(f.plugin, f.message) for f in cfg.tuning.faults] == [
        (
            "bad",
            "knobs break kernel constraints, layer dropped: page_size 4096 is above 2048, the "
            "most a sequence of max_model_len 2048 needs",
        ),
        (
            "worse",
            "knobs break kernel constraints, layer dropped: rpa_v2.num_queries_per_block 100000 "
            "must be in 1..2048 (max batched tokens)",
        ),
    ]


def test_a_plugin_page_no_kernel_can_run_drops_its_layer():
    """A page that passes the page rules but leaves no kernel able to run (one page of 8192
    tokens of head dim 256 needs 151 MB of VMEM by upstream's estimate, above v6e's 128 MiB
    core) drops its layer with the kernel's reason; the baseline's page stands."""
    import tpu_registry
    from tpu_registry import Layer

    class Big:
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            return Layer("big", {"page_size": 8192, "head_dim_padded": 512})

    class Small:  # its page wins next: the rerun with it pinned must not bring "big" back
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            return Layer("small", {"page_size": 128})

    w = Workload(32, 8, 256, max_model_len=8192)
    pm = get_plugin_manager()
    pm.register(Small(), name="small")
    pm.register(Big(), name="big")
    try:
        cfg = resolve(w, simulate="v6e")
    finally:
        pm.unregister(name="small")
        pm.unregister(name="big")
    assert cfg.tuning.layers == ("small", "baseline")
    assert (cfg.value("page_size"), cfg.layer("page_size")) == (128, "small")
    assert cfg.layer("head_dim_padded") == "baseline"
    assert [(f.plugin, f.message, f.stage) for f in cfg.tuning.faults] == [
        (
            "big",
            "knobs break kernel constraints, layer dropped: the RPA v3 kernel needs 151126016 "
            "bytes of VMEM for one page of 8192 tokens, above the 134217728-byte limit [rule "
            "rpa_v3_vmem_estimate]",
            "tune",
        )
    ]
    pm.register(Big(), name="big")
    try:
        with pytest.raises(TuningError, match="151126016 bytes of VMEM for one page of 8192"):
            resolve(w, simulate="v6e", strict=True)
    finally:
        pm.unregister(name="big")


def test_the_users_page_no_kernel_can_run_is_an_error(tmp_path):
    """The same page from the user's overrides is not dropped: it is an error."""
    f = _overrides_file(
        tmp_path, '[[override]]\ngeneration = "v6e"\nknobs = { page_size = 8192 }\n'
    )
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 256, max_model_len=8192), simulate="v6e", overrides=f)
    assert str(e.value) == (
        "workload: page_size: the RPA v3 kernel needs 151126016 bytes of VMEM for one page of "
        "8192 tokens, above the 134217728-byte limit [rule rpa_v3_vmem_estimate] (lower "
        "max_num_seqs or max_model_len so that a smaller page fits SMEM)"
    )


def test_an_overrides_file_served_from_its_snapshot_still_places_its_problems(tmp_path):
    """An unchanged file comes from its validated snapshot, without its text; problems found
    after validation (a generation the catalog does not know) still name their line."""
    from tpu_registry.policies import overrides as policy

    f = tmp_path / "ov.toml"
    f.write_text(
        'schema_version = 1\n[[override]]\ngeneration = "v42"\nknobs = { page_size = 64 }\n'
    )
    old = time.time_ns() - 10 * 10**9  # older than the snapshot's racy window: trusted
    os.utime(f, ns=(old, old))
    expected = (
        f"{f}:3: override[0].generation: 'v42' names no generation (use an id from "
        '`tpu-registry list`, or "*")'
    )
    for _ in range(2):  # built and stored, then served from the snapshot
        policy.clear_cache()
        with pytest.raises(TuningError) as e:
            resolve(Workload(32, 8, 128), simulate="v6e", overrides=f)
        assert str(e.value) == expected


def test_an_overrides_path_that_cannot_be_read_says_why():
    with pytest.raises(TuningError) as e:
        resolve(Workload(32, 8, 128), simulate="v6e", overrides="ov\0.toml")
    (p,) = e.value.problems
    assert (p.path, p.line, p.field, p.message, p.hint) == (
        "ov\0.toml",
        None,
        "",
        "cannot read the overrides file: ValueError: embedded null byte",
        "fix the file or unset TPU_REGISTRY_OVERRIDES / --overrides",
    )


def test_the_overrides_note_names_each_entry_once_and_the_knobs_left_out(tmp_path):
    """The layer's note: the file, each note of an entry that set a knob (once), and the
    knobs of kernel families that do not run this workload, sorted, with the ones that do."""
    f = tmp_path / "ov.toml"
    f.write_text(
        "schema_version = 1\n"
        '[[override]]\ngeneration = "*"\nnote = "pool A"\n'
        'knobs = { "rpa_v3.d_block_sizes" = [1, 256, 1, 256], '
        '"rpa_v2.num_queries_per_block" = 16 }\n'
        '[[override]]\ngeneration = "*"\nnote = "pool A"\nknobs = { vmem_limit_bytes = 16777216 }\n'
        '[[override]]\ngeneration = "*"\nnote = "unused"\nknobs = { vmem_limit_bytes = 2097152 }\n'
        '[[override]]\ngeneration = "v6e"\nnote = "pool B"\n'
        'knobs = { "rpa_v2.num_kv_pages_per_block" = 8 }\n'
    )
    f.chmod(0o644)
    hd64 = resolve(Workload(8, 2, 64), simulate="v6e", overrides=f)
    assert [n for n in hd64.notes if n.startswith("overrides:")] == [
        f"overrides: from {f}; pool A; pool B; not applied (the kernels that run this "
        "workload: rpa_v2, rpa_v3_hd64): rpa_v3.d_block_sizes"
    ]
    assert hd64.value("rpa_v2.num_queries_per_block") == 16
    assert hd64.value("vmem_limit_bytes") == 16777216  # a common knob: every family reads it
    # No kernel of v4 runs an MLA model: every family knob is left out, and said so.
    mla = Workload(16, 1, 576, kv_lora_rank=512, qk_rope_head_dim=64)
    v4 = resolve(mla, simulate="v4", overrides=f)
    assert [n for n in v4.notes if n.startswith("overrides:")] == [
        f"overrides: from {f}; pool A; not applied (the kernels that run this workload: none): "
        "rpa_v2.num_queries_per_block, rpa_v3.d_block_sizes"
    ]
    # An entry setting only knobs that do not run still says what it left out.
    g = tmp_path / "idle.toml"
    g.write_text(
        'schema_version = 1\n[[override]]\ngeneration = "v6e"\n'
        'knobs = { "mla_v2.decode_batch_size" = 8 }\n'
    )
    g.chmod(0o644)
    cfg = resolve(Workload(32, 8, 128), simulate="v6e", overrides=g)
    assert "overrides" not in {k.layer for k in cfg.knobs.values()}
    assert [n for n in cfg.notes if n.startswith("overrides:")] == [
        f"overrides: from {g}; not applied (the kernels that run this workload: rpa_v2, "
        "rpa_v3): mla_v2.decode_batch_size"
    ]


def test_the_overrides_policy_module_names_a_missing_attribute():
    """The module loads its pydantic models on first use; any other name is an AttributeError
    that says which module and which name."""
    from tpu_registry.policies import overrides as policy

    assert policy.OverridesFile.__name__ == "OverridesFile"
    with pytest.raises(AttributeError) as e:
        policy.nope  # noqa: B018
    assert str(e.value) == "module 'tpu_registry.policies.overrides' has no attribute 'nope'"


def test_hd64_defaults_say_what_they_change_from_upstream_and_refuse_what_cannot_run(cat):
    """The head-dim-64 kernel's defaults on a tuned-table miss: upstream's fallback of 2048 KV
    tokens per block, clamped per call. A page it holds once is used as is, with no note; a
    page it does not hold at all is 1 page instead, said so; a core with less VMEM than
    upstream's default limit caps it, said so; and a page that alone needs more VMEM than the
    limit is refused, with upstream's estimate for it."""
    from tpu_registry import kernels

    def defaults(gid, page, kv=1, max_model_len=8192):
        spec = cat[gid]
        w = Workload(8 * kv, kv, 64, max_model_len=max_model_len)
        vmem = spec.chip.vmem_bytes_per_core
        return kernels.rpa_v3_hd64_defaults(spec.kernels.rpa_v3_hd64, vmem, w, page)

    blocks = ("rpa_v3_hd64.num_kv_pages_per_block", "rpa_v3_hd64.num_queries_per_block")
    knobs, notes = defaults("v6e", 2048)  # 2048 // 2048: one page, upstream's own choice
    assert ([knobs[b] for b in blocks], knobs["rpa_v3_hd64.vmem_limit_bytes"], notes) == (
        [1, 32],
        100 * MIB,
        [],
    )
    knobs, notes = defaults("v6e", 4096)  # 2048 // 4096 = 0 pages
    assert ([knobs[b] for b in blocks], notes) == (
        [1, 32],
        [
            "rpa_v3_hd64: upstream's fallback of 2048 KV tokens per block holds no page of "
            "4096 tokens (0 pages); 1 page instead"
        ],
    )
    knobs, notes = defaults("v5p", 2048)  # a 64 MiB core
    assert (knobs["rpa_v3_hd64.vmem_limit_bytes"], notes) == (
        64 * MIB,
        [
            f"rpa_v3_hd64.vmem_limit_bytes {64 * MIB} (the core's VMEM) instead of upstream's "
            f"default {100 * MIB}"
        ],
    )
    # A core whose VMEM holds one query and one page, not upstream's 32 queries: shrunk.
    spec, w = cat["v6e"], Workload(8, 1, 64, max_model_len=8192)
    core = up_hd64_vmem("bfloat16", 8, 1, 1, 2048, "bfloat16")
    knobs, notes = kernels.rpa_v3_hd64_defaults(spec.kernels.rpa_v3_hd64, core, w, 2048)
    assert ([knobs[b] for b in blocks], notes[1:]) == (
        [1, 1],
        [
            f"rpa_v3_hd64 blocks (1, 1) instead of upstream's (1, 32), which need "
            f"{up_hd64_vmem('bfloat16', 8, 1, 32, 2048, 'bfloat16')} bytes of VMEM (limit {core})"
        ],
    )
    need = up_hd64_vmem("bfloat16", 64, 8, 1, 32768, "bfloat16")
    assert need > 100 * MIB
    with pytest.raises(TuningError) as e:
        defaults("v6e", 32768, kv=8, max_model_len=32768)
    (p,) = e.value.problems
    assert (p.path, p.line, p.field, p.message, p.hint) == (
        "workload",
        None,
        "page_size",
        f"the head-dim-64 RPA v3 kernel needs {need} bytes of VMEM for one page of 32768 tokens, "
        f"above the {100 * MIB}-byte limit [rule rpa_v3_hd64_vmem_estimate]",
        "lower max_num_seqs or max_model_len so that a smaller page fits SMEM",
    )


def test_rpa_v2_heads_per_block_are_upstreams_in_whole_numbers(cat):
    """torch_xla's get_min_heads_per_blk, transcribed above: 9 KV heads (18 combined, 9 tiles
    of two bf16 heads) cannot be tiled, and the v2 defaults say so."""
    from tpu_registry import kernels

    for q, kv, q_dtype, kv_dtype in product(
        (8, 32, 36, 64), (1, 2, 4, 8, 9, 16), ("bfloat16", "float32"), ("bfloat16", "int8")
    ):
        got = kernels.min_heads_per_block(q, 2 * kv, q_dtype, kv_dtype)
        assert got == up_min_heads_per_blk(q, 2 * kv, q_dtype, kv_dtype), (q, kv)
        assert got is None or {type(x) for x in got} == {int}
    assert kernels.min_heads_per_block(36, 18, "bfloat16", "bfloat16") is None
    spec = cat["v6e"]
    v2 = kernels.rpa_v2_defaults(
        spec.kernels.rpa_v2, 128, spec.chip.vmem_bytes_per_core, Workload(36, 9, 128), 128
    )
    assert v2 == "rpa_v2: 18 combined KV heads cannot be tiled for bfloat16"


def test_hd64_vmem_estimate_is_upstreams_for_every_dtype():
    """Upstream's hd64 get_vmem_estimate_bytes (transcribed above) for every packing: the
    baseline grid has no 32-bit KV cache, whose 32 bits per element are packed one to a word."""
    from tpu_registry import kernels

    for q_dtype, kv_dtype in product(BITS, BITS):
        w = Workload(16, 2, 64, q_dtype=q_dtype, kv_dtype=kv_dtype)
        got = kernels.rpa_v3_hd64_vmem_bytes(w, 32, 2048)
        assert got == up_hd64_vmem(kv_dtype, 16, 2, 32, 2048, q_dtype), (q_dtype, kv_dtype)


def test_hd64_blocks_are_halved_queries_first_down_to_one_page_and_one_query():
    """Blocks above the VMEM limit are halved, queries first, then KV pages, to the first
    that fits upstream's estimate: at the estimate of 2 pages and 1 query, 8 pages and 32
    queries become (2, 1); at that of 1 page, (1, 1); below it, nothing fits."""
    from tpu_registry import kernels

    w, page = Workload(16, 2, 64), 256
    for pages, want in ((2, (2, 1)), (1, (1, 1))):
        limit = up_hd64_vmem("bfloat16", 16, 2, 1, pages * page, "bfloat16")
        got = kernels.rpa_v3_hd64_fit_vmem(w, page, (8, 32), limit)
        assert (got, {type(x) for x in got}) == (want, {int})
    assert kernels.rpa_v3_hd64_fit_vmem(w, page, (8, 32), limit - 1) is None


def test_rpa_v3_defaults_under_a_catalog_vmem_limit(cat):
    """A generation file may set [kernels.rpa_v3] vmem_limit_mib (none does today): the limit
    is that, capped at the core, and each of upstream's tuples above it is shrunk to fit,
    with a note giving upstream's tuple and what it needs by upstream's estimate."""
    from tpu_registry import kernels

    spec, w, page = cat["v6e"], Workload(32, 8, 128, max_model_len=8192), 128

    def replace(facts, **changes):
        return type(facts).from_dict({**facts.to_dict(), **changes})

    core = spec.chip.vmem_bytes_per_core
    capped, _ = kernels.rpa_v3_defaults(
        replace(spec.kernels.rpa_v3, vmem_limit_mib=1024), core, w, page
    )
    assert capped["rpa_v3.vmem_limit_bytes"] == core
    limit = 4 * MIB
    got, notes = kernels.rpa_v3_defaults(
        replace(spec.kernels.rpa_v3, vmem_limit_mib=4), core, w, page
    )
    assert got["rpa_v3.vmem_limit_bytes"] == limit
    expected = []
    for case, knob in (("decode", "d"), ("prefill", "p"), ("mixed", "m")):
        t = up_rpa_v3(6, "bfloat16", "bfloat16", 32, 8, 128, page, 8192, 8192 // page, case)
        need = up_vmem("bfloat16", 32, 8, 128, t[0], t[1])
        if need > limit:
            name = f"rpa_v3.{knob}_block_sizes"
            expected.append(
                f"{name} {got[name]} instead of upstream's {t}, which needs {need} bytes of "
                f"VMEM (limit {limit})"
            )
    assert len(expected) >= 2 and notes == expected


def test_rpa_v3_blocks_are_shrunk_queries_first_down_to_one_query():
    """At the estimate of one query and the whole KV block, the queries are halved all the way
    down to 1 before the KV block is touched; the chunks stay divisors of their blocks."""
    from tpu_registry import kernels

    w, page = Workload(32, 8, 128, max_model_len=8192), 128
    limit = up_vmem("bfloat16", 32, 8, 128, 1, 1024)
    got = kernels.rpa_v3_fit_vmem(w, (32, 1024, 16, 512), page, limit)
    assert got == (1, 1024, 1, 512)


def test_rpa_v3_vmem_estimate_is_upstreams_for_every_dtype():
    """Upstream's get_vmem_estimate_bytes (transcribed above) for every packing, 32-bit
    queries and KV caches (one element per word) included."""
    from tpu_registry import kernels

    for q_dtype, kv_dtype in product(BITS, BITS):
        w = Workload(32, 8, 128, q_dtype=q_dtype, kv_dtype=kv_dtype)
        got = kernels.rpa_v3_vmem_bytes(w, 32, 1024)
        assert got == up_vmem(kv_dtype, 32, 8, 128, 32, 1024, q_dtype), (q_dtype, kv_dtype)


def test_rpa_v3_shrunk_chunks_divide_their_blocks():
    """Shrinking the query block from 32 to 16 keeps a chunk of 8 and a KV chunk of one page
    (each divides its block), rather than the block itself or two pages."""
    from tpu_registry import kernels

    w, page = Workload(32, 8, 128, max_model_len=8192), 128
    limit = up_vmem("bfloat16", 32, 8, 128, 16, 1024)
    assert kernels.rpa_v3_fit_vmem(w, (32, 1024, 8, 128), page, limit) == (16, 1024, 8, 128)


def test_too_many_sequences_for_smem_name_the_generation(cat):
    """An MLA model gets the MLA backend's page, raised to the SMEM floor: with more sequences
    than half of SMEM has 4-byte block-table entries, there is none, on that generation."""
    smem = cat["v6e"].chip.smem_bytes_per_core
    limit = smem // 2 // 4
    mla = Workload(16, 1, 576, kv_lora_rank=512, qk_rope_head_dim=64, max_num_seqs=limit + 1)
    with pytest.raises(TuningError) as e:
        resolve(mla, simulate="v6e")
    assert e.value.problems[0].message == (
        f"{limit + 1} sequences leave no SMEM for block tables on v6e (at most {limit})"
    )
