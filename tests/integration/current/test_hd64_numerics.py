"""Head dim 64 (and attention sinks) through the backend's ``attention()``: the hd64 kernel
gets the registry's knobs for the call, and the answer matches an independent NumPy reference.

As in ``test_attention_numerics.py``, the seam (``kernel_binding``) is bound to upstream's own
reference implementation (``ref_ragged_paged_attention_hd64``: the Pallas kernel cannot run on
CPU) through a wrapper that records the keyword arguments; everything else is real:
tpu-inference's ``attention`` entry point, its metadata, ``shard_map`` over a CPU mesh with its
axis names, and the hd64 cache layout from the registry's plan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from runner_metadata import runner_metadata  # this folder
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel_hd64 as hd64
from tpu_inference.layers.common.attention_interface import attention
from tpu_registry_vllm import kernel_binding
from tpu_registry_vllm import tpu_inference_backend as tib

from tpu_registry import Workload, resolve

HQ, HKV, D = 8, 2, 64
MAX_MODEL_LEN, MAX_SEQS, MAX_TOKENS = 256, 8, 512
T = 64
SEQS = [(1, 37), (1, 100), (20, 20), (13, 150), (9, 60)]  # (q_len, kv_len), decodes first
TUNING = ("num_kv_pages_per_block", "num_queries_per_block", "vmem_limit_bytes")


class RecordingRef:
    """Seam stand-in: record kwargs, drop the tuning ones, run the reference on the host."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, q, k, v, cache, kv_lens, pages, cu, dist, sinks=None, **kw):
        self.calls.append(dict(kw, sinks=sinks is not None))
        for name in TUNING:
            kw.pop(name)
        rows = q.shape[0]

        def host(*arrays):
            out, new = hd64.ref_ragged_paged_attention_hd64(*arrays, **kw)
            out = np.asarray(out)
            pad = np.zeros((rows - out.shape[0], *out.shape[1:]), out.dtype)
            return np.concatenate([out, pad]), np.asarray(new)

        args = (q, k, v, cache, kv_lens, pages, cu, dist) + ((sinks,) if sinks is not None else ())
        shapes = (
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        )
        return jax.pure_callback(host, shapes, *args)


def write_kv(cache, pages, k, v):
    """The hd64 layout: head h at (h // packing, h % packing), K in lanes 0-63, V in 64-127."""
    page, pack = cache.shape[1], cache.shape[3]
    for t in range(k.shape[0]):
        for h in range(k.shape[1]):
            row = cache[pages[t // page], t % page, h // pack, h % pack]
            row[:64], row[64:] = k[t, h], v[t, h]


def read_kv(cache, pages, n, heads):
    page = cache.shape[1]
    flat = np.asarray(cache[pages], np.float32).reshape(len(pages) * page, -1, 128)[:n, :heads]
    return flat[..., :64], flat[..., 64:]


def numpy_attention(q, k_new, v_new, cache, tables, page, sm_scale, window, sinks):
    out = np.zeros(q.shape, np.float32)
    group = q.shape[1] // k_new.shape[1]
    q0 = 0
    for s, (q_len, kv_len) in enumerate(SEQS):
        hist = kv_len - q_len
        k_old, v_old = read_kv(cache, tables[s][: -(-kv_len // page)], hist, k_new.shape[1])
        keys = np.concatenate([k_old, k_new[q0 : q0 + q_len]])
        vals = np.concatenate([v_old, v_new[q0 : q0 + q_len]])
        q_pos = hist + np.arange(q_len)[:, None]
        k_pos = np.arange(kv_len)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= q_pos - k_pos < window
        for h in range(q.shape[1]):
            logits = np.where(
                mask, q[q0 : q0 + q_len, h] @ keys[:, h // group].T * sm_scale, -np.inf
            )
            top = logits.max(axis=-1, keepdims=True)
            if sinks is not None:
                top = np.maximum(top, sinks[h])
            e = np.exp(logits - top)
            total = e.sum(axis=-1, keepdims=True)
            if sinks is not None:  # a sink takes probability mass but contributes no value
                total += np.exp(sinks[h] - top)
            out[q0 : q0 + q_len, h] = (e / total) @ vals[:, h // group]
        q0 += q_len
    return out


def config(dtype, window, sinks):
    name = jnp.dtype(dtype).name
    return resolve(
        Workload(
            num_q_heads=HQ,
            num_kv_heads=HKV,
            head_dim=D,
            q_dtype=name,
            kv_dtype=name,
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=MAX_SEQS,
            max_num_batched_tokens=MAX_TOKENS,
            sliding_window=window,
            attention_sinks=sinks,
        )
    )


def batch(cfg, dtype, rng):
    backend = tib.RegistryAttentionBackend(cfg)
    page = cfg.value("page_size")
    pps = -(-MAX_MODEL_LEN // page)
    total = MAX_SEQS * pps + 3
    cache = np.zeros(backend.get_kv_cache_shape(total, page, HKV, D, dtype), np.float32)
    order = rng.permutation(total)
    tables = [order[s * pps : (s + 1) * pps] for s in range(MAX_SEQS)]
    n = sum(ql for ql, _ in SEQS)
    q, k, v = (np.zeros((T, h, D), np.float32) for h in (HQ, HKV, HKV))
    q[:n], k[:n], v[:n] = (rng.normal(size=(n, h, D)) for h in (HQ, HKV, HKV))
    for s, (q_len, kv_len) in enumerate(SEQS):
        hist = kv_len - q_len
        write_kv(cache, tables[s], rng.normal(size=(hist, HKV, D)), rng.normal(size=(hist, HKV, D)))
    q, k, v, cache = (
        np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v, cache)
    )
    md = runner_metadata(SEQS, MAX_SEQS, tables, T)
    return backend, md, tables, q, k, v, cache


@pytest.mark.parametrize(
    "dtype,window,with_sinks,tol",
    [
        (jnp.float32, None, True, 2e-5),
        (jnp.float32, 48, True, 2e-5),
        (jnp.float32, 48, False, 2e-5),
        (jnp.bfloat16, None, True, 4e-2),
    ],
)
def test_hd64_attention_matches_numpy(dtype, window, with_sinks, tol):
    cfg = config(dtype, window, with_sinks)
    assert cfg.generation == "v6e"  # TPU_ACCELERATOR_TYPE=v6e-1 from run_tests.sh
    rng = np.random.default_rng(3)
    backend, md, tables, q, k, v, cache = batch(cfg, dtype, rng)
    sinks = rng.normal(size=HQ).astype(np.float32) * 2 if with_sinks else None
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    rec = RecordingRef()
    sm_scale = D**-0.5
    with kernel_binding.bind("rpa_v3_hd64", rec):
        new_cache, out = attention(
            jnp.asarray(cache, dtype),
            jnp.asarray(q, dtype),
            jnp.asarray(k, dtype),
            jnp.asarray(v, dtype),
            md,
            mesh,
            sm_scale=sm_scale,
            attention_chunk_size=window,
            sinks=None if sinks is None else jnp.asarray(sinks),
            attention_backend=backend,
        )
    # The registry's knobs for this call (T tokens, every head in one shard, this window).
    assert len(rec.calls) == 1
    kw = rec.calls[0]
    call = cfg.for_call(T, q_heads=HQ, kv_heads=HKV, sliding_window=window)
    want_tuning = call.kernel_kwargs("rpa_v3_hd64")
    assert {n: kw[n] for n in TUNING} == want_tuning
    assert want_tuning["num_queries_per_block"] <= T  # clamped per call, as upstream does
    assert kw["sinks"] == with_sinks and kw["sliding_window"] == window
    assert kw["sm_scale"] == sm_scale and kw["soft_cap"] is None
    # upstream's own static validation accepts exactly what the adapter passes
    hd64.static_validate_inputs(
        jnp.asarray(q, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        jnp.asarray(cache, dtype),
        md.seq_lens,
        md.block_tables,
        md.query_start_loc,
        md.request_distribution,
        None if sinks is None else jnp.asarray(sinks),
        **{n: kw[n] for n in ("sm_scale", "sliding_window", "soft_cap", *TUNING)},
    )
    n = sum(ql for ql, _ in SEQS)
    want = numpy_attention(
        q[:n], k[:n], v[:n], cache, tables, cfg.value("page_size"), sm_scale, window, sinks
    )
    got = np.asarray(out, np.float32)
    assert got.shape == (T, HQ, D)
    np.testing.assert_allclose(got[:n], want, rtol=tol, atol=tol)
    new = np.asarray(jnp.asarray(new_cache).astype(jnp.float32))
    q0 = 0
    for s, (q_len, kv_len) in enumerate(SEQS):
        k_all, v_all = read_kv(new, tables[s][: -(-kv_len // cfg.value("page_size"))], kv_len, HKV)
        np.testing.assert_array_equal(k_all[kv_len - q_len :], k[q0 : q0 + q_len])
        np.testing.assert_array_equal(v_all[kv_len - q_len :], v[q0 : q0 + q_len])
        q0 += q_len


def test_sinks_change_the_answer():
    """The NumPy reference is sensitive to the sinks it checks."""
    cfg = config(jnp.float32, None, True)
    _, _, tables, q, k, v, cache = batch(cfg, jnp.float32, np.random.default_rng(3))
    n = sum(ql for ql, _ in SEQS)
    sinks = np.full(HQ, 3.0, np.float32)
    args = (q[:n], k[:n], v[:n], cache, tables, cfg.value("page_size"), D**-0.5, None)
    assert np.abs(numpy_attention(*args, sinks) - numpy_attention(*args, None)).max() > 0.1


def test_dispatch_mirrors_tpu_inference():
    """Head dim 64 runs through the seam unless upstream's hd64 path refuses the call (KV
    sharing, bidirectional attention); sinks at other head dims, context parallelism and the
    batched kernel go to tpu-inference's own path."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    hd64_q, q128 = jnp.zeros((4, 8, 64)), jnp.zeros((4, 8, 128))
    assert tib._delegate(hd64_q, None, mesh, True, True) is None
    assert tib._delegate(hd64_q, jnp.zeros(8), mesh, True, True) is None
    assert "KV sharing" in tib._delegate(hd64_q, None, mesh, False, True)
    assert "bidirectional" in tib._delegate(hd64_q, None, mesh, True, False)
    assert "head dim 64" in tib._delegate(q128, jnp.zeros(8), mesh, True, True)
    assert tib._delegate(q128, None, mesh, True, True) is None
