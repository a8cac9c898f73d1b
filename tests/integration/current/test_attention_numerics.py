"""Issue 5, test 2: the backend's ``attention()`` against an independent NumPy reference.

The Pallas kernel cannot run on CPU, so the seam is bound to tpu-inference's own reference
implementation (``ref_ragged_paged_attention``) through a small wrapper that records the
keyword arguments the adapter passes and drops the tuning ones the reference does not take.
Everything else is real: tpu-inference's ``attention_interface.attention`` entry point, its
``AttentionMetadata`` built the way its runner builds it, ``jax.shard_map`` over a 1-device CPU
mesh with tpu-inference's axis names, the KV cache layout from the registry's plan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from runner_metadata import runner_metadata  # this folder
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel as v3
from tpu_inference.layers.common.attention_backend import RPAAttentionBackend
from tpu_inference.layers.common.attention_interface import attention
from tpu_registry_vllm import kernel_binding
from tpu_registry_vllm import tpu_inference_backend as tib

from tpu_registry import Workload, resolve

HQ, HKV, D = 8, 2, 128
MAX_MODEL_LEN, MAX_SEQS, MAX_TOKENS = 256, 8, 512
T = 64  # tokens in this step, padded (the runner pads to a compiled bucket)
# (q_len, kv_len): two decodes first (the runner orders them first), then prefills and
# chunked prefills with history: a mixed batch.
SEQS = [(1, 37), (1, 100), (20, 20), (13, 150), (9, 60)]


class RecordingRef:
    """Seam stand-in: record kwargs, drop the tuning ones, run the reference on the host."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, **kw):
        self.calls.append(dict(kw))
        for name in tib.KERNEL_TUNING:
            kw.pop(name, None)
        assert kw.pop("update_kv_cache") is True
        rows = q.shape[0]

        def host(*arrays):
            out, cache = v3.ref_ragged_paged_attention(*arrays, **kw)
            out = np.asarray(out)
            pad = np.zeros((rows - out.shape[0], *out.shape[1:]), out.dtype)
            return np.concatenate([out, pad]), np.asarray(cache)

        out_dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16
        shapes = (
            jax.ShapeDtypeStruct(q.shape, out_dtype),
            jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        )
        return jax.pure_callback(
            host, shapes, q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution
        )


# ---------------------------------------------------------------- independent NumPy reference


def read_kv(cache, pages, n_tokens, n_kv_heads, head_dim):
    """K and V of one sequence, (tokens, heads, dim), gathered from its pages."""
    p, page, c, pack, dp = cache.shape
    flat = np.asarray(cache[pages], np.float32).reshape(len(pages) * page, c * pack, dp)[:n_tokens]
    return flat[:, 0 : 2 * n_kv_heads : 2, :head_dim], flat[:, 1 : 2 * n_kv_heads : 2, :head_dim]


def write_kv(cache, pages, start, k, v):
    """Write tokens ``start..`` of one sequence (K and V interleaved per head, packed)."""
    page, pack = cache.shape[1], cache.shape[3]
    for i in range(k.shape[0]):
        t = start + i
        for h in range(k.shape[1]):
            for j, x in ((2 * h, k[i, h]), (2 * h + 1, v[i, h])):
                cache[pages[t // page], t % page, j // pack, j % pack, : x.shape[0]] = x


def numpy_attention(q, k_new, v_new, cache, tables, seqs, page, sm_scale, window, soft_cap):
    out = np.zeros(q.shape, np.float32)
    group = q.shape[1] // k_new.shape[1]
    q0 = 0
    for s, (q_len, kv_len) in enumerate(seqs):
        hist = kv_len - q_len
        k_old, v_old = read_kv(
            cache, tables[s][: -(-kv_len // page)], hist, k_new.shape[1], q.shape[2]
        )
        keys = np.concatenate([k_old, k_new[q0 : q0 + q_len]])
        vals = np.concatenate([v_old, v_new[q0 : q0 + q_len]])
        q_pos = hist + np.arange(q_len)[:, None]
        k_pos = np.arange(kv_len)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= q_pos - k_pos < window
        for h in range(q.shape[1]):
            logits = q[q0 : q0 + q_len, h] @ keys[:, h // group].T * sm_scale
            if soft_cap is not None:
                logits = soft_cap * np.tanh(logits / soft_cap)
            logits = np.where(mask, logits, -np.inf)
            w = np.exp(logits - logits.max(axis=-1, keepdims=True))
            out[q0 : q0 + q_len, h] = (w / w.sum(axis=-1, keepdims=True)) @ vals[:, h // group]
        q0 += q_len
    return out


# ---------------------------------------------------------------- the test


def build_batch(cfg, dtype, rng):
    backend = tib.RegistryAttentionBackend(cfg)
    page = cfg.value("page_size")
    pps = -(-MAX_MODEL_LEN // page)
    total_pages = MAX_SEQS * pps + 3
    shape = backend.get_kv_cache_shape(total_pages, page, HKV, D, dtype)
    cache = np.zeros(shape, np.float32)
    order = rng.permutation(total_pages)  # pages scattered over the pool
    tables = [order[s * pps : (s + 1) * pps] for s in range(MAX_SEQS)]
    n_tok = sum(q for q, _ in SEQS)
    q = np.zeros((T, HQ, D), np.float32)
    k = np.zeros((T, HKV, D), np.float32)
    v = np.zeros((T, HKV, D), np.float32)
    q[:n_tok] = rng.normal(size=(n_tok, HQ, D)) * 3
    k[:n_tok] = rng.normal(size=(n_tok, HKV, D))
    v[:n_tok] = rng.normal(size=(n_tok, HKV, D))
    for s, (q_len, kv_len) in enumerate(SEQS):
        hist = kv_len - q_len
        write_kv(
            cache, tables[s], 0, rng.normal(size=(hist, HKV, D)), rng.normal(size=(hist, HKV, D))
        )
    # Round everything to the dtype under test so both sides see the same inputs.
    q, k, v, cache = (
        np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v, cache)
    )
    md = runner_metadata(SEQS, MAX_SEQS, tables, T)
    return backend, md, tables, q, k, v, cache


@pytest.mark.parametrize(
    "dtype,window,soft_cap,tol",
    [
        (jnp.float32, None, None, 2e-5),
        (jnp.float32, 48, 2.0, 2e-5),
        (jnp.bfloat16, 48, 2.0, 4e-2),
    ],
)
def test_attention_matches_numpy(dtype, window, soft_cap, tol):
    name = jnp.dtype(dtype).name
    cfg = resolve(
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
        )
    )
    assert cfg.generation == "v6e"  # TPU_ACCELERATOR_TYPE=v6e-1 from run_tests.sh
    rng = np.random.default_rng(7)
    backend, md, tables, q, k, v, cache = build_batch(cfg, dtype, rng)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    rec = RecordingRef()
    sm_scale = D**-0.5
    with kernel_binding.bind("rpa_v3", rec):
        new_cache, out = attention(
            jnp.asarray(cache, dtype),
            jnp.asarray(q, dtype),
            jnp.asarray(k, dtype),
            jnp.asarray(v, dtype),
            md,
            mesh,
            sm_scale=sm_scale,
            attention_chunk_size=window,
            attn_logits_soft_cap=soft_cap,
            attention_backend=backend,
        )

    # Exactly the registry's kernel knobs reach the kernel, once, with the layer's settings.
    assert len(rec.calls) == 1
    kw = rec.calls[0]
    # resolved for this call: T padded tokens, one shard with every head
    call = cfg.for_call(T, q_heads=HQ, kv_heads=HKV)
    assert call.workload.tokens == T and call.value("page_size") == cfg.value("page_size")
    assert {n: kw[n] for n in tib.KERNEL_TUNING if n in kw} == tib.kernel_kwargs(call)
    assert "vmem_limit_bytes" in kw and "d_block_sizes" in kw
    assert {
        n: kw[n]
        for n in (
            "sm_scale",
            "sliding_window",
            "soft_cap",
            "use_causal_mask",
            "update_kv_cache",
            "q_scale",
            "k_scale",
            "v_scale",
        )
    } == {
        "sm_scale": sm_scale,
        "sliding_window": window,
        "soft_cap": soft_cap,
        "use_causal_mask": True,
        "update_kv_cache": True,
        "q_scale": None,
        "k_scale": None,
        "v_scale": None,
    }

    n_tok = sum(ql for ql, _ in SEQS)
    want = numpy_attention(
        q[:n_tok],
        k[:n_tok],
        v[:n_tok],
        cache,
        tables,
        SEQS,
        cfg.value("page_size"),
        sm_scale,
        window,
        soft_cap,
    )
    got = np.asarray(out, np.float32)
    assert got.shape == (T, HQ, D)
    np.testing.assert_allclose(got[:n_tok], want, rtol=tol, atol=tol)
    assert not np.any(got[n_tok:])  # padding tokens stay zero

    # The new tokens' K and V were written to their pages.
    new = np.asarray(jnp.asarray(new_cache).astype(jnp.float32))
    q0 = 0
    for s, (q_len, kv_len) in enumerate(SEQS):
        k_all, v_all = read_kv(
            new, tables[s][: -(-kv_len // cfg.value("page_size"))], kv_len, HKV, D
        )
        np.testing.assert_array_equal(k_all[kv_len - q_len :], k[q0 : q0 + q_len])
        np.testing.assert_array_equal(v_all[kv_len - q_len :], v[q0 : q0 + q_len])
        q0 += q_len


def test_window_and_cap_change_the_answer():
    """The reference is sensitive to what it checks: without the window and the cap the same
    batch gives a different answer."""
    rng = np.random.default_rng(7)
    cfg = resolve(
        Workload(
            num_q_heads=HQ,
            num_kv_heads=HKV,
            head_dim=D,
            q_dtype="float32",
            kv_dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=MAX_SEQS,
            max_num_batched_tokens=MAX_TOKENS,
        )
    )
    _, _, tables, q, k, v, cache = build_batch(cfg, jnp.float32, rng)
    n = sum(ql for ql, _ in SEQS)
    a = numpy_attention(
        q[:n], k[:n], v[:n], cache, tables, SEQS, cfg.value("page_size"), D**-0.5, None, None
    )
    b = numpy_attention(
        q[:n], k[:n], v[:n], cache, tables, SEQS, cfg.value("page_size"), D**-0.5, 48, 2.0
    )
    assert np.abs(a - b).max() > 0.1


@pytest.mark.parametrize(
    "pages,page,heads,dim,dtype",
    [
        (8, 16, 2, 128, jnp.bfloat16),
        (5, 32, 3, 96, jnp.float32),
        (4, 64, 8, 256, jnp.float8_e4m3fn),
        (3, 128, 1, 80, jnp.bfloat16),
        (2, 16, 4, 64, jnp.bfloat16),
    ],
)
def test_kv_cache_shape_is_upstreams(pages, page, heads, dim, dtype):
    """The registry's plan gives the layout tpu-inference's kernels expect."""
    ours = tib.RegistryAttentionBackend().get_kv_cache_shape(pages, page, heads, dim, dtype)
    assert ours == RPAAttentionBackend().get_kv_cache_shape(pages, page, heads, dim, dtype)


def test_kernel_rejected_tuples_are_not_passed():
    """With few batched tokens the baseline's prefill/mixed tuple (as tpu-inference's own
    default would be) has bq_sz % bq_csz != 0. The kernel accepts it from its own heuristic but
    rejects it as an argument (static_validate_inputs), so the adapter leaves it out."""
    cfg = resolve(
        Workload(
            num_q_heads=HQ,
            num_kv_heads=HKV,
            head_dim=D,
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=MAX_SEQS,
            max_num_batched_tokens=64,
        )
    )
    m = cfg.value("rpa_v3.m_block_sizes")
    assert m[0] % m[2] != 0, m
    kw = tib.kernel_kwargs(cfg)
    assert "m_block_sizes" not in kw and "p_block_sizes" not in kw
    assert kw["d_block_sizes"] == cfg.value("rpa_v3.d_block_sizes")
    page = cfg.value("page_size")
    cache = jnp.zeros(v3.get_kv_cache_shape(8, page, HKV, D, jnp.bfloat16), jnp.bfloat16)
    args = (
        jnp.zeros((64, HQ, D), jnp.bfloat16),
        jnp.zeros((64, HKV, D), jnp.bfloat16),
        jnp.zeros((64, HKV, D), jnp.bfloat16),
        cache,
        jnp.zeros(MAX_SEQS, jnp.int32),
        jnp.zeros(MAX_SEQS * 16, jnp.int32),
        jnp.zeros(MAX_SEQS + 1, jnp.int32),
        jnp.zeros(3, jnp.int32),
    )
    with pytest.raises(ValueError, match="bq_csz"):
        v3.static_validate_inputs(*args, m_block_sizes=m)
    v3.static_validate_inputs(*args, **kw)  # what the adapter passes is accepted
