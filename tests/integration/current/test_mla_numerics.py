"""MLA: what the registry can reach (the page size and the cache layout) through tpu-inference's
own MLA path, checked numerically, and the MLA kernel's arguments checked against the registry.

tpu-inference 0.32 has no registered-backend seam for MLA: ``attention_interface.mla_attention``
builds the MLA v2 kernel's arguments itself. This test runs that function for real on a CPU
mesh with a cache laid out by the registry's plan (page size from the registry: a page of 64
tokens, two packed rows of 32), the Pallas kernel (which cannot run on CPU) replaced at its
import site by upstream's own MLA reference (``mla/v1``'s ``ref_mla_ragged_paged_attention``, the
same cache layout) behind a recorder. The v1 reference's own input check wants a cache packed by
dtype, while the v2 kernel packs by ``MLA_KV_PACKING_SIZE``; the recorder runs the v2 kernel's
``static_validate_inputs`` on the real arguments instead. It asserts that the arguments
tpu-inference hands the kernel are exactly the registry's ``mla_v2`` knobs for the call, and
that the output and the cache update match an independent NumPy MLA computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from runner_metadata import runner_metadata  # this folder
from tpu_inference.kernels.mla.v1 import kernel as mla_v1
from tpu_inference.kernels.mla.v2 import kernel as mla_v2
from tpu_inference.layers.common import attention_interface

from tpu_registry import Workload, plan, resolve

HEADS, LKV, ROPE = 4, 128, 64  # a cache row holds 128 latent + 64 rope lanes, padded to 256
MAX_MODEL_LEN, MAX_SEQS, MAX_TOKENS, PAGE = 256, 8, 512, 64
T = 64
SEQS = [(1, 37), (1, 100), (20, 20), (13, 150), (9, 60)]


class RecordingRef:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, q, q_rope, k, k_rope, cache, kv_lens, pages, cu, dist, **kw):
        self.calls.append(dict(kw))
        heads, rows = q.shape[0], q.shape[1]
        sm_scale = kw["sm_scale"]

        def host(q, q_rope, k, k_rope, cache, kv_lens, pages, cu, dist):
            mla_v2.static_validate_inputs(
                q,
                q_rope,
                k,
                k_rope,
                cache,
                kv_lens,
                pages,
                cu,
                dist,
                num_kv_pages_per_blocks=kw["num_kv_pages_per_block"],
                num_queries_per_blocks=kw["num_queries_per_block"],
                decode_batch_size=kw["decode_batch_size"],
                mixed_q_split=kw["mixed_q_split"],
            )
            out, new = mla_v1.ref_mla_ragged_paged_attention(
                jnp.transpose(q, (1, 0, 2)),
                q_rope,
                k,
                k_rope,
                cache,
                kv_lens,
                pages,
                cu,
                dist,
                sm_scale=sm_scale,
            )
            out = np.asarray(out)
            out = np.concatenate([out, np.zeros((rows - out.shape[0], *out.shape[1:]), out.dtype)])
            return np.transpose(out, (1, 0, 2)), np.asarray(new)

        shapes = (
            jax.ShapeDtypeStruct((heads, rows, q.shape[2]), q.dtype),
            jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        )
        return jax.pure_callback(
            host, shapes, q, q_rope, k, k_rope, cache, kv_lens, pages, cu, dist
        )


def slot(cache, pages, t):
    page = cache.shape[1] * cache.shape[2]
    return pages[t // page], (t % page) // cache.shape[2], (t % page) % cache.shape[2]


def test_mla_attention_through_tpu_inference_matches_numpy(monkeypatch):
    cfg = resolve(
        Workload(
            HEADS,
            1,
            LKV + ROPE,
            kv_lora_rank=LKV,
            qk_rope_head_dim=ROPE,
            q_dtype="float32",
            kv_dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=MAX_SEQS,
            max_num_batched_tokens=MAX_TOKENS,
            page_size=PAGE,
        )
    )
    assert cfg.generation == "v6e" and cfg.value("page_size") == PAGE
    rng = np.random.default_rng(5)
    pps = -(-MAX_MODEL_LEN // PAGE)
    total = MAX_SEQS * pps + 3
    cache = np.zeros(plan(cfg).kv_cache_shape("tpu_inference", total), np.float32)
    assert cache.shape == (total, PAGE // 32, 32, 256)
    order = rng.permutation(total)
    tables = [order[s * pps : (s + 1) * pps] for s in range(MAX_SEQS)]
    n = sum(ql for ql, _ in SEQS)
    q = np.zeros((HEADS, T, LKV), np.float32)
    q_rope = np.zeros((T, HEADS, ROPE), np.float32)
    k = np.zeros((T, LKV), np.float32)
    k_rope = np.zeros((T, ROPE), np.float32)
    q[:, :n], q_rope[:n] = (
        rng.normal(size=(HEADS, n, LKV)) / 4,
        rng.normal(size=(n, HEADS, ROPE)) / 4,
    )
    k[:n], k_rope[:n] = rng.normal(size=(n, LKV)), rng.normal(size=(n, ROPE))
    history = {}
    for s, (q_len, kv_len) in enumerate(SEQS):
        hist = kv_len - q_len
        c, pe = rng.normal(size=(hist, LKV)), rng.normal(size=(hist, ROPE))
        history[s] = (c, pe)
        for t in range(hist):
            cache[slot(cache, tables[s], t)][:LKV] = c[t]
            cache[slot(cache, tables[s], t)][LKV : LKV + ROPE] = pe[t]
    md = runner_metadata(SEQS, MAX_SEQS, tables, T)
    md.padded_num_reqs = MAX_SEQS  # the runner pads requests; the registry keys by max_num_seqs
    rec = RecordingRef()
    monkeypatch.setattr(attention_interface, "mla_ragged_paged_attention", rec)
    monkeypatch.setattr(mla_v1, "dynamic_validate_inputs", lambda *a, **k: None)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    sm_scale = (LKV + ROPE) ** -0.5
    new_cache, out = attention_interface.mla_attention(
        jnp.asarray(q),
        jnp.asarray(q_rope),
        jnp.asarray(k),
        jnp.asarray(k_rope),
        jnp.asarray(cache),
        md,
        mesh,
        HEADS,
        LKV,
        sm_scale=sm_scale,
    )
    # what tpu-inference passed the kernel is the registry's mla_v2 knobs for this call
    assert len(rec.calls) == 1
    kw = rec.calls[0]
    want = cfg.for_call(T).kernel_kwargs("mla_v2")
    assert want.pop("vmem_limit_bytes") == 128 * 2**20  # not passed: the kernel's own default
    assert {name: kw[name] for name in want} == want
    assert "vmem_limit_bytes" not in kw
    # independent NumPy MLA: logits from latent and rope parts, values are the latents
    got = np.asarray(out)
    assert got.shape == (HEADS, T, LKV)
    q0 = 0
    for s, (q_len, kv_len) in enumerate(SEQS):
        hist = kv_len - q_len
        lat = np.concatenate([history[s][0], k[q0 : q0 + q_len]])
        rope = np.concatenate([history[s][1], k_rope[q0 : q0 + q_len]])
        mask = np.arange(kv_len)[None, :] <= hist + np.arange(q_len)[:, None]
        for h in range(HEADS):
            logits = (
                q[h, q0 : q0 + q_len] @ lat.T + q_rope[q0 : q0 + q_len, h] @ rope.T
            ) * sm_scale
            logits = np.where(mask, logits, -np.inf)
            w = np.exp(logits - logits.max(axis=-1, keepdims=True))
            want_out = (w / w.sum(axis=-1, keepdims=True)) @ lat
            np.testing.assert_allclose(got[h, q0 : q0 + q_len], want_out, rtol=2e-5, atol=2e-5)
        # the new tokens landed in the registry's layout
        new = np.asarray(new_cache)
        for j in range(q_len):
            row = new[slot(new, tables[s], hist + j)]
            np.testing.assert_array_equal(row[:LKV], k[q0 + j])
            np.testing.assert_array_equal(row[LKV : LKV + ROPE], k_rope[q0 + j])
        q0 += q_len
