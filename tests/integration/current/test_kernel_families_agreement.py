"""Kernel coverage: the head-dim-64 and MLA families agree with tpu-inference 0.32's own code.

For every generation tpu-inference runs (``get_tpu_version()`` 5 to 8), on at least 1,000
workloads per family (random ones, un-rounded, plus ones built from the imported tables' keys
so that hits are exercised), the registry's baseline and tables layers, resolved for one call
(``for_call``: the call's padded tokens, one shard's heads, the layer's window), equal:

- hd64: ``tuned_block_sizes_hd64.get_tuned_block_sizes`` (table lookup, per-version fallback,
  per-call clamp), called as ``ragged_paged_attention_hd64`` calls it, with ``jax.devices()``
  answering the generation's ``device_kind`` (its only hardware read); the VMEM limit is the
  kernel's ``DEFAULT_VMEM_LIMIT_BYTES``;
- MLA: ``mla/v2/tuned_params.get_tuned_params`` for the batched-decode and mixed
  ``TuningKey``s ``attention_interface.mla_attention`` builds, assembled into the kernel's
  tuples the way it assembles them; the VMEM limit is the kernel's default
  (``get_tpu_info().vmem_capacity_bytes``), the page size ``PallasMLAttentionBackend``'s.

Differences must be exactly those in KNOWN_DIFFERENCES (each with its reason); the test holds
the list equal to the differences found. Every config also passes the kernel's own
``static_validate_inputs``, and the registry's MLA cache shape is upstream's
``get_kv_cache_shape`` (directly and through the runner's ``get_kv_cache_shape_with_mesh``).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tomllib
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh
from tpu_inference import envs
from tpu_inference.kernels.mla.v2 import kernel as mla
from tpu_inference.kernels.mla.v2 import tuned_params as mla_params
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel_hd64 as hd64
from tpu_inference.kernels.ragged_paged_attention.v3 import tuned_block_sizes_hd64 as hd64_tables
from tpu_inference.layers.vllm.backends.flash_attn_mla import PallasMLAttentionBackend
from tpu_inference.runner.kv_cache import get_kv_cache_shape_with_mesh

from tpu_registry import TuningError, Workload, load_catalog, plan, resolve

N = 1000  # workloads per generation and family
GENERATIONS = ("v5e", "v5p", "v6e", "tpu7x", "tpu8i", "tpu8t")
TUNING = Path(__file__).resolve().parents[3] / "hardware" / "tuning"
JNP = {
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "float8_e5m2": jnp.float8_e5m2,
}
# "<generation>:<family>.<what>" -> why the registry differs from tpu-inference there.
KNOWN_DIFFERENCES = {
    "v5p:rpa_v3_hd64.vmem_limit_bytes": (
        "kernel_hd64 passes DEFAULT_VMEM_LIMIT_BYTES (100 MiB) on every chip; v5p cores have 64 "
        "MiB, and the registry never hands out a limit above the core"
    ),
    "tpu7x:rpa_v3_hd64.vmem_limit_bytes": "as v5p: TPU7x cores have 64 MiB of VMEM",
}
FOUND: set[str] = set()


@pytest.fixture(autouse=True)
def quiet():
    """get_tuned_params warns once per miss; thousands of misses are expected here."""
    logger = logging.getLogger(mla_params.logger.name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture
def device(monkeypatch):
    """``jax.devices()`` answers the generation's device kind: tpu-inference's
    ``get_device_name`` / ``get_tpu_version`` read nothing else."""

    def use(kind: str) -> None:
        monkeypatch.setattr(jax, "devices", lambda *a, **k: [SimpleNamespace(device_kind=kind)])

    return use


def upstream_vmem(spec) -> int:
    cores = spec.chip.tensorcores_per_chip // spec.chip.jax_devices_per_chip
    dev = jax.sharding.AbstractDevice(
        device_kind=spec.identify.device_kinds[0], num_cores=cores, platform="tpu"
    )
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    ):
        return pltpu.get_tpu_info().vmem_capacity_bytes


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


# ----------------------------------------------------------------------------- hd64


def hd64_workloads(seed: int, n: int) -> list[Workload]:
    """Random head-dim-64 workloads, a third of them on the imported tables' keys."""
    rng = random.Random(seed)
    rows = [
        r for p in TUNING.glob("rpa_v3_hd64_*.toml") for r in tomllib.loads(p.read_text())["rows"]
    ]
    out: list[Workload] = []
    while len(out) < n:
        tp = rng.choice([1, 1, 2, 4])
        if rng.random() < 0.35:
            page, qd, kvd, qh, kvh, length, sw = rng.choice(rows)[:7]
            kv, q = kvh * tp, qh * tp
            length = rng.randint(length // 2 + 1, length)  # any length that rounds to the key
            window = sw or None
            page_size = page
        else:
            kv = rng.choice([1, 2, 4, 8, 16])
            q = kv * rng.choice([1, 2, 3, 4, 8, 16])
            if q % tp:
                continue
            qd, kvd = rng.choice(
                [("bfloat16", "bfloat16"), ("float32", "float32"), ("bfloat16", "float8_e4m3fn")]
            )
            length = rng.choice(
                [rng.randint(16, 4096), rng.randint(4097, 131072), 2 ** rng.randint(8, 16)]
            )
            window = rng.choice([None, None, 128, rng.randint(16, 4096)])
            page_size = None
        seqs = rng.choice([1, 16, 64, 128, 256, 512])
        batched = rng.choice([256, 512, 1024, 2048, 4096, 8192])
        try:
            out.append(
                Workload(
                    q,
                    kv,
                    64,
                    q_dtype=qd,
                    kv_dtype=kvd,
                    max_model_len=length,
                    max_num_seqs=seqs,
                    max_num_batched_tokens=batched,
                    num_tokens=rng.choice(
                        [b for b in (16, 32, 64, 128, 256, 512, 1024) if b <= batched]
                    ),
                    sliding_window=window,
                    tensor_parallel=tp,
                    page_size=page_size,
                    attention_sinks=rng.random() < 0.3,
                )
            )
        except Exception:  # a page above a short sequence: not a workload vLLM would build
            continue
    return out


@pytest.mark.parametrize("gen", GENERATIONS)
def test_hd64_layers_equal_tpu_inference(gen, device):
    spec = load_catalog()[gen]
    device(spec.identify.device_kinds[0])
    counts: Counter = Counter()
    diffs: Counter = Counter()
    for w in hd64_workloads(seed=len(gen) * 7 + spec.generation, n=N):
        cfg = resolve(w, simulate=gen)
        knobs = cfg.tuning.knobs
        # one shard's heads, computed here: q split, KV replicated below the device count
        q, kv = w.num_q_heads // w.tensor_parallel, max(1, w.num_kv_heads // w.tensor_parallel)
        page = cfg.value("page_size")
        pages = -(-w.max_model_len // page)
        theirs = hd64_tables.get_tuned_block_sizes(
            JNP[w.q_dtype], JNP[w.kv_dtype], q, kv, 64, page, w.tokens, pages, w.sliding_window
        )
        ours = (
            knobs["rpa_v3_hd64.num_kv_pages_per_block"].value,
            knobs["rpa_v3_hd64.num_queries_per_block"].value,
        )
        layer = knobs["rpa_v3_hd64.num_kv_pages_per_block"].layer
        counts[layer] += 1
        vmem = knobs["rpa_v3_hd64.vmem_limit_bytes"].value
        if ours != theirs:
            # only where upstream's blocks need more VMEM than the limit, by its own estimate
            need = hd64.get_vmem_estimate_bytes(
                kv, q // kv, 64, theirs[1], theirs[0] * page, JNP[w.q_dtype], JNP[w.kv_dtype]
            )
            assert need > vmem, (gen, w, ours, theirs)
            diffs["rpa_v3_hd64.blocks shrunk to fit VMEM"] += 1
        if vmem != hd64.DEFAULT_VMEM_LIMIT_BYTES:
            assert vmem == min(hd64.DEFAULT_VMEM_LIMIT_BYTES, spec.chip.vmem_bytes_per_core)
            diffs["rpa_v3_hd64.vmem_limit_bytes"] += 1
        # and the kernel's own static validation accepts the knobs, as the adapter passes them
        qd, kvd = JNP[w.q_dtype], JNP[w.kv_dtype]
        hd64.static_validate_inputs(
            sds((w.tokens, q, 64), qd),
            sds((w.tokens, kv, 64), kvd),
            sds((w.tokens, kv, 64), kvd),
            sds(hd64.get_kv_cache_shape(pages * w.max_num_seqs, page, kv, 64, kvd), kvd),
            sds((w.max_num_seqs,), jnp.int32),
            sds((w.max_num_seqs * pages,), jnp.int32),
            sds((w.max_num_seqs + 1,), jnp.int32),
            sds((3,), jnp.int32),
            sds((q,), jnp.float32) if w.attention_sinks else None,
            sliding_window=w.sliding_window,
            **cfg.kernel_kwargs("rpa_v3_hd64"),
        )
        counts["checked"] += 1
    for what in diffs:
        if f"{gen}:{what}" not in KNOWN_DIFFERENCES and "shrunk" not in what:
            pytest.fail(f"{gen}: undocumented difference {what} ({diffs[what]} workloads)")
    FOUND.update(f"{gen}:{what}" for what in diffs if "shrunk" not in what)
    print(f"\n{gen} hd64: {dict(counts)}; differences {dict(diffs)}")
    assert counts["checked"] >= 1000
    if gen in ("v5e", "v6e", "tpu7x"):  # the generations upstream's table has rows for
        assert counts["tables"] >= 200, counts


# ----------------------------------------------------------------------------- MLA


def mla_workloads(seed: int, n: int) -> list[Workload]:
    """Random MLA workloads (DeepSeek V2-Lite / V3, Kimi-K2 shapes and others), a third on
    the imported tables' keys that a default cache (kv_packing 32) can meet."""
    rng = random.Random(seed)
    rows = []
    for p in TUNING.glob("mla_v2_*.toml"):
        doc = tomllib.loads(p.read_text())
        rows += [r[: len(doc["key"])] for r in doc["rows"] if r[7] == 32]
    out: list[Workload] = []
    while len(out) < n:
        if rng.random() < 0.35:
            tokens, heads, lkv, rope, kvd, qd, rows_per_page, pack, seqs, pps = rng.choice(rows)
            page, length, batched = rows_per_page * pack, pps * rows_per_page * pack, tokens
        else:
            heads = rng.choice([16, 32, 64, 128])
            lkv, rope = rng.choice([(512, 64), (256, 64), (512, 32)])
            qd, kvd = rng.choice(
                [
                    ("bfloat16", "bfloat16"),
                    ("float8_e4m3fn", "float8_e4m3fn"),
                    ("bfloat16", "float8_e4m3fn"),
                ]
            )
            seqs = rng.choice([1, 16, 64, 77, 128, 160, 256])
            length = rng.choice([rng.randint(1024, 8192), rng.randint(8193, 163840)])
            batched = rng.choice([256, 512, 1024, 2048, 8192])
            tokens = rng.choice([b for b in (4, 8, 16, 64, 128, 256, 512) if b <= batched])
            page = rng.choice([None, None, None, 256, 512])
        out.append(
            Workload(
                heads,
                1,
                lkv + rope,
                kv_lora_rank=lkv,
                qk_rope_head_dim=rope,
                q_dtype=qd,
                kv_dtype=kvd,
                max_model_len=length,
                max_num_seqs=seqs,
                max_num_batched_tokens=batched,
                num_tokens=tokens,
                page_size=page,
                tensor_parallel=rng.choice([1, 4, 8]),
            )
        )
    return out


def mla_upstream(w: Workload, page: int) -> dict:
    """What ``mla_attention`` passes the kernel for this call, on upstream's default cache."""
    lkv, rope = w.kv_lora_rank, w.qk_rope_head_dim
    shape = mla.get_kv_cache_shape(8, page, lkv + rope, JNP[w.kv_dtype], envs.MLA_KV_PACKING_SIZE)
    pages = -(-w.max_model_len // page)
    key = dict(
        max_num_tokens=w.tokens,
        actual_num_q_heads=w.num_q_heads,
        actual_lkv_dim=lkv,
        actual_r_dim=rope,
        kv_dtype=jnp.dtype(JNP[w.kv_dtype]).name,
        q_dtype=jnp.dtype(JNP[w.q_dtype]).name,
        page_size_per_kv_packing=shape[1],
        kv_packing=shape[2],
        max_num_seqs=w.max_num_seqs,
        pages_per_seq=pages,
    )
    bd = mla_params.get_tuned_params(mla_params.TuningKey(case="batched_decode", **key))
    mixed = mla_params.get_tuned_params(mla_params.TuningKey(case="mixed", **key))
    return {
        "num_kv_pages_per_block": (
            bd.num_kv_pages_per_block,
            mixed.num_kv_pages_per_block,
            mixed.num_kv_pages_per_block,
        ),
        "num_queries_per_block": (
            bd.num_queries_per_block,
            mixed.num_queries_per_block,
            mixed.num_queries_per_block,
        ),
        "decode_batch_size": bd.decode_batch_size,
        "mixed_q_split": mixed.q_split,
    }


@pytest.mark.parametrize("gen", GENERATIONS)
def test_mla_layers_equal_tpu_inference(gen):
    spec = load_catalog()[gen]
    vmem = upstream_vmem(spec)
    counts: Counter = Counter()
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    for w in mla_workloads(seed=spec.generation * 13 + len(gen), n=N + 100):
        try:
            cfg = resolve(w, simulate=gen)
        except TuningError as e:  # a user page below the SMEM floor: the registry's own rule
            assert w.page_size is not None and "[rule page_smem_minimum]" in str(e), e
            counts["refused: user page below the SMEM minimum (registry rule)"] += 1
            continue
        page = cfg.value("page_size")
        vc = SimpleNamespace(model_config=SimpleNamespace(max_model_len=w.max_model_len))
        assert page == (w.page_size or PallasMLAttentionBackend.get_page_size(vc)), w
        kwargs = cfg.kernel_kwargs("mla_v2")
        assert kwargs.pop("vmem_limit_bytes") == vmem  # the kernel's default: the core's VMEM
        assert kwargs == mla_upstream(w, page), (gen, w)
        counts[cfg.layer("mla_v2.decode_batch_size")] += 1
        counts[cfg.layer("mla_v2.mixed_q_split")] += 1
        p = plan(cfg)
        kvd = JNP[w.kv_dtype]
        shape = mla.get_kv_cache_shape(
            5, page, w.head_dim, kvd, envs.MLA_KV_PACKING_SIZE, transpose_kv_cache=False
        )
        assert p.kv_cache_shape("tpu_inference", 5) == shape
        assert (
            get_kv_cache_shape_with_mesh(mesh, 5, page, 1, w.head_dim, kvd, use_mla=True) == shape
        )
        pages = -(-w.max_model_len // page)
        mla.static_validate_inputs(
            sds((w.num_q_heads, w.tokens, w.kv_lora_rank), JNP[w.q_dtype]),
            sds((w.tokens, w.num_q_heads, w.qk_rope_head_dim), JNP[w.q_dtype]),
            sds((w.tokens, w.kv_lora_rank), kvd),
            sds((w.tokens, w.qk_rope_head_dim), kvd),
            sds(shape, kvd),
            sds((w.max_num_seqs,), jnp.int32),
            sds((w.max_num_seqs * pages,), jnp.int32),
            sds((w.max_num_seqs + 1,), jnp.int32),
            sds((3,), jnp.int32),
            num_kv_pages_per_blocks=kwargs["num_kv_pages_per_block"],
            num_queries_per_blocks=kwargs["num_queries_per_block"],
            vmem_limit_bytes=vmem,
            decode_batch_size=kwargs["decode_batch_size"],
            mixed_q_split=kwargs["mixed_q_split"],
        )
        counts["checked"] += 1
    print(f"\n{gen} MLA: {dict(counts)}")
    assert counts["checked"] >= 1000 and counts["tables"] >= 300, counts


def test_known_differences_are_the_differences_found():
    """Runs after the per-generation tests (file order): the documented list is exactly what
    they found, so a stale entry fails as surely as an undocumented difference."""
    assert FOUND == set(KNOWN_DIFFERENCES)
