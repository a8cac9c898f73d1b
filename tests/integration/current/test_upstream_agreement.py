"""Issue 5, test 4: the registry's ``baseline`` equals what tpu-inference computes itself.

For every generation tpu-inference's RPA v3 code handles (``get_tpu_version()`` 5, 6, 7, 8),
on random workloads:

- block sizes: ``get_default_block_sizes`` (decode, prefill, mixed) with ``get_tpu_version``
  patched in the kernel module to the generation's version (its only hardware read), called
  the way the kernel calls it (per-device heads, ``pages_per_seq * page_size`` tokens of KV);
- VMEM limit: the kernel's default, ``pltpu.get_tpu_info().vmem_capacity_bytes``, evaluated
  under an abstract mesh whose device has the generation's JAX ``device_kind``;
- page size, minimum page size, SMEM-bound max_num_seqs: ``PallasAttentionBackend``'s statics
  on minimal config objects; the page size as ``TpuPlatform`` applies it (raised to the minimum).

One difference, by design, is counted and checked against upstream's own functions: where
upstream's tuple needs more VMEM than the limit by upstream's own ``get_vmem_estimate_bytes``,
the registry shrinks it until it fits (valid as an explicit argument, never larger), and where
not even one query and one page fit, it refuses the workload. Any other difference must be
listed in KNOWN_DIFFERENCES with its reason; there are none today.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel as v3
from tpu_inference.layers.vllm.backends.flash_attn import PallasAttentionBackend

from tpu_registry import TuningError, Workload, load_catalog
from tpu_registry.policies.baseline import tpu_registry_tune
from tpu_registry.units import cdiv

N = 1500  # workloads per generation
# Generation -> the number tpu-inference's get_tpu_version() returns for it.
GENERATIONS = {"v5e": 5, "v5p": 5, "v6e": 6, "tpu7x": 7, "tpu8i": 8, "tpu8t": 8}
JNP = {
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "float8_e5m2": jnp.float8_e5m2,
}
DTYPES = [
    ("bfloat16", "bfloat16"),
    ("float32", "float32"),
    ("bfloat16", "float8_e4m3fn"),
    ("bfloat16", "float8_e5m2"),
]
KNOWN_DIFFERENCES: dict[str, str] = {}  # "<generation>:<what>" -> reason
SUMMARY: dict[str, dict[str, int]] = {}


def random_workloads(seed: int, n: int):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kv = rng.choice([1, 2, 4, 8, 16, 32])
        group = rng.choice([1, 2, 3, 4, 5, 7, 8, 16])
        tp = rng.choice([1, 1, 2, 4, 8])
        if (kv * group) % tp:
            continue
        q_dtype, kv_dtype = rng.choice(DTYPES)
        max_model_len = rng.choice(
            [
                rng.randint(16, 512),
                rng.randint(512, 8192),
                rng.randint(8193, 131072),
                2 ** rng.randint(7, 17),
            ]
        )
        max_num_seqs = rng.choice([1, 8, 16, 64, 128, 256, 512, rng.randint(1, 1024)])
        if 1024 * 1024 // 2 // max_num_seqs // 4 == 0:
            continue
        out.append(
            Workload(
                num_q_heads=kv * group,
                num_kv_heads=kv,
                # head dim 64 runs the hd64 kernel: test_kernel_families_agreement.py
                head_dim=rng.choice([80, 96, 112, 128, 192, 256]),
                q_dtype=q_dtype,
                kv_dtype=kv_dtype,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=rng.choice(
                    [16, 64, 256, 512, 1024, 2048, 4096, 8192, rng.randint(16, 16384)]
                ),
                tensor_parallel=tp,
            )
        )
    return out


def per_device(w: Workload) -> tuple[int, int]:
    """Query and KV heads of one device under tensor parallelism, computed here (not by the
    code under test): vLLM splits query heads and replicates KV heads when there are fewer
    than devices."""
    return w.num_q_heads // w.tensor_parallel, max(1, w.num_kv_heads // w.tensor_parallel)


def upstream_vmem(device_kind: str, num_cores: int) -> int:
    device = jax.sharding.AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform="tpu"
    )
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    ):
        return pltpu.get_tpu_info().vmem_capacity_bytes


def vllm_config(w: Workload):
    return SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=w.max_model_len),
        scheduler_config=SimpleNamespace(max_num_seqs=w.max_num_seqs),
    )


@pytest.mark.parametrize("gen", list(GENERATIONS))
def test_baseline_equals_tpu_inference(gen, monkeypatch):
    spec = load_catalog()[gen]
    version = GENERATIONS[gen]
    assert spec.generation == version
    assert "rpa_v3" in spec.kernels.families
    monkeypatch.setattr(v3, "get_tpu_version", lambda: version)
    kind = spec.identify.device_kinds[0]
    vmem = upstream_vmem(kind, spec.chip.tensorcores_per_chip // spec.chip.jax_devices_per_chip)
    counts = {
        "workloads": 0,
        "block_sizes": 0,
        "vmem": 0,
        "page_size": 0,
        "min_page_size": 0,
        "max_num_seqs": 0,
        "differences": 0,
        "kernel_rejects_as_argument": 0,
        "shrunk_to_fit_vmem": 0,
        "refused_no_page_fits_vmem": 0,
    }
    diffs = []

    def estimate(w: Workload, t: tuple[int, int, int, int]) -> int:
        return v3.get_vmem_estimate_bytes(
            per_device(w)[1],
            per_device(w)[0] // per_device(w)[1],
            w.head_dim,
            t[0],
            t[1],
            JNP[w.q_dtype],
            JNP[w.kv_dtype],
        )

    for w in random_workloads(seed=version * 100 + len(gen), n=N):
        try:
            knobs = tpu_registry_tune(spec, w).knobs
        except TuningError:
            # Refused only when one query and one page of KV exceed upstream's estimate.
            vc = vllm_config(w)
            page = max(
                PallasAttentionBackend.get_page_size(vc),
                PallasAttentionBackend.get_min_page_size(vc),
            )
            assert estimate(w, (1, page, 1, page)) > vmem, w
            counts["refused_no_page_fits_vmem"] += 1
            continue
        counts["workloads"] += 1
        vc = vllm_config(w)
        page = max(
            PallasAttentionBackend.get_page_size(vc), PallasAttentionBackend.get_min_page_size(vc)
        )
        checks = {
            "page_size": (knobs["page_size"], page),
            "min_page_size": (knobs["min_page_size"], PallasAttentionBackend.get_min_page_size(vc)),
            "max_num_seqs": (
                knobs["max_num_seqs_smem"],
                PallasAttentionBackend.get_max_num_seqs(w.max_model_len, page),
            ),
            "vmem": (knobs["rpa_v3.vmem_limit_bytes"], vmem),
        }
        ours_page = knobs["page_size"]
        upstream_blocks = []
        for case in (v3.RpaCase.DECODE, v3.RpaCase.PREFILL, v3.RpaCase.MIXED):
            d = v3.get_default_block_sizes(
                JNP[w.q_dtype],
                JNP[w.kv_dtype],
                *per_device(w),
                w.head_dim,
                ours_page,
                w.max_num_batched_tokens,
                w.max_num_seqs,
                cdiv(w.max_model_len, ours_page),
                case=case,
            )
            upstream_blocks.append((d["bq_sz"], d["bkv_sz"], d["bq_csz"], d["bkv_csz"]))
        ours_blocks = [knobs[f"rpa_v3.{k}_block_sizes"] for k in "dpm"]
        for i, (ours, theirs) in enumerate(zip(ours_blocks, upstream_blocks, strict=True)):
            if estimate(w, theirs) <= vmem:
                continue
            # Upstream's own estimate is above its limit: ours fits, is no larger, and is a
            # tuple the kernel takes as an explicit argument.
            assert estimate(w, ours) <= vmem and ours[0] <= theirs[0] and ours[1] <= theirs[1]
            assert ours[0] % ours[2] == 0 and ours[1] % ours[3] == 0, ours
            assert ours[1] % ours_page == 0 and ours[3] % ours_page == 0, ours
            upstream_blocks[i] = ours
            counts["shrunk_to_fit_vmem"] += 1
        checks["block_sizes"] = (ours_blocks, upstream_blocks)
        for what, (ours, theirs) in checks.items():
            if ours == theirs:
                counts[what] += 1
            elif f"{gen}:{what}" not in KNOWN_DIFFERENCES:
                diffs.append(f"{what}: registry {ours} != tpu-inference {theirs} for {w}")
        # Not a difference from upstream, but worth counting: tuples upstream's own heuristic
        # makes that its kernel would refuse as explicit arguments (see the adapter).
        if any(b[0] % b[2] or b[1] % b[3] for b in upstream_blocks):
            counts["kernel_rejects_as_argument"] += 1
    counts["differences"] = len(diffs)
    SUMMARY[gen] = counts
    print(f"\n{gen} (tpu_version {version}, device_kind {kind!r}, VMEM {vmem}): {counts}")
    assert not diffs, f"{len(diffs)} differences, first: " + "\n".join(diffs[:5])
    checked = counts["workloads"]  # refused workloads are counted apart
    for what in ("block_sizes", "vmem", "page_size", "min_page_size", "max_num_seqs"):
        assert counts[what] == checked >= 1000


def test_unsupported_generations_are_unsupported_upstream_too(monkeypatch):
    """v4 and older have no RPA v3 kernel in the catalog; tpu-inference refuses them too."""
    catalog = load_catalog()
    for gen in ("v2", "v3", "v4"):
        assert "rpa_v3" not in catalog[gen].kernels.families
    monkeypatch.setattr(v3, "get_tpu_version", lambda: 4)
    with pytest.raises(NotImplementedError):
        v3.get_default_block_sizes(
            jnp.bfloat16, jnp.bfloat16, 8, 2, 128, 16, 512, 16, 128, case=v3.RpaCase.MIXED
        )
