"""CPU stand-ins for the TPU-only parts of tpu-inference 0.32, for the end-to-end tests only.

Each shim names the upstream line it works around. None of them touches the registry's
product code: the plugin runs exactly as on a TPU host, and only what cannot run on XLA:CPU
(the mesh order by physical coordinates, HBM sizes, TPU compiler flags, Pallas kernels) is
replaced. ``install()`` must run before tpu-inference's runner, sampler and model loader are
imported (the sampler bakes its compiler options into a decorator at import time).
"""

from __future__ import annotations

import threading
from typing import Any

HBM_BYTES = 16 * 1024**3  # what the shim reports per CPU "chip"; the KV cache size is pinned anyway

# Tuning keywords of the v3 kernel: only the Pallas kernel uses them; the reference takes none.
TUNING = (
    "d_block_sizes",
    "p_block_sizes",
    "m_block_sizes",
    "vmem_limit_bytes",
    "chunk_prefill_size",
)


def install() -> None:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    # jax.device_put on XLA:CPU aliases a 64-byte-aligned NumPy array instead of copying it
    # (PJRT's zero-copy host buffers); on a TPU it copies to HBM. tpu-inference reuses its
    # host staging buffer from step to step (tpu_inference/utils.py, DeviceBuffer: build()
    # returns a view of self.buffer, reset() and append() rewrite it for the next step;
    # runner/tpu_runner.py hands the view to device_array(), i.e. jax.device_put), and with
    # vLLM's async scheduling the next step is prepared while the previous one still runs.
    # On CPU the running step can then read the next step's input ids, positions and
    # sequence lengths (seen as sporadic wrong tokens). Copy host arrays first, as a transfer
    # to a TPU does. Installed before tpu-inference is imported; it calls jax.device_put
    # through the module.
    device_put = jax.device_put

    def device_put_copying(x, *args, **kwargs):
        x = jax.tree.map(
            lambda leaf: np.array(leaf, copy=True) if isinstance(leaf, np.ndarray) else leaf, x
        )
        return device_put(x, *args, **kwargs)

    jax.device_put = device_put_copying

    import tpu_inference.models.common.compiler_options as compiler_options
    from tpu_inference import utils

    # tpu_inference/models/common/compiler_options.py, get_step_fn_compiler_options() and
    # get_sampling_compiler_options(): xla_tpu_* options, passed to jax.jit by
    # models/vllm/vllm_model_wrapper.py (the step function), models/common/model_loader.py,
    # runner/decode_loop.py and layers/jax/sample/sampling.py (`@jax.jit(...,
    # compiler_options=get_sampling_compiler_options())` on `sample`, evaluated at import).
    # XLA:CPU rejects unknown options, so both return no options here.
    compiler_options.get_step_fn_compiler_options = lambda: {}
    compiler_options.get_sampling_compiler_options = lambda: {}

    # tpu_inference/utils.py, make_optimized_mesh(): `sorted(devices, key=lambda x: x.coords)`;
    # CPU devices have no physical coordinates. runner/tpu_runner.py imports the function by
    # name (`from tpu_inference.utils import ... make_optimized_mesh`), so it is replaced
    # before the runner is imported: the same mesh, devices in jax.devices() order.
    def make_mesh_in_device_order(axis_shapes, axis_names, *, devices=None):
        devices = list(jax.devices() if devices is None else devices)
        n = int(np.prod(axis_shapes))
        return Mesh(
            np.array(devices[:n]).reshape(axis_shapes),
            axis_names,
            axis_types=(jax.sharding.AxisType.Auto,) * len(axis_shapes),
        )

    utils.make_optimized_mesh = make_mesh_in_device_order

    # tpu_inference/utils.py, get_device_hbm_limit() -> get_device_name(): `raise
    # RuntimeError('Expected TPU devices')` for any non-TPU device. CPU devices report no
    # memory stats, so hbm_usage_bytes() (worker/tpu_worker.py determine_available_memory, and
    # the hbm=... log lines of the runner and KV cache manager) falls back to
    # pathways_hbm_usage_gb(), which asks for the HBM limit. The KV cache size itself is
    # pinned with num_gpu_blocks_override, so this number only feeds logs and the memory
    # check.
    utils.get_device_hbm_limit = lambda: HBM_BYTES


def _kind(q_lens, kv_lens) -> str:
    if all(q == 1 for q in q_lens):
        return "decode"
    if all(q == kv for q, kv in zip(q_lens, kv_lens, strict=True)):
        return "prefill"
    return "mixed"


def numpy_rpa(
    q,
    k,
    v,
    kv_cache,
    kv_lens,
    page_indices,
    cu_q_lens,
    distribution,
    *,
    sm_scale,
    sliding_window=None,
    soft_cap=None,
    use_causal_mask=True,
    q_scale=None,
    k_scale=None,
    v_scale=None,
):
    """What tpu-inference's ``ref_ragged_paged_attention`` computes, in NumPy (float32 math).

    Same contract: writes the new tokens' K and V into their pages (K and V interleaved per
    head, packed along the sublane axis, as ``merge_kv`` lays them out) and returns
    ``(out, new_kv_cache)``, ``out`` zero past the last real token. It exists because the
    upstream reference compiles every operation anew for every new sequence length (about a
    second per call on this machine); ``RecordingReference`` checks it against the upstream
    reference on real engine calls.
    """
    import numpy as np

    if q_scale is not None or k_scale is not None or v_scale is not None:
        raise NotImplementedError("quantized KV is not part of the end-to-end test")
    cache = np.array(kv_cache)  # a copy: the caller's buffer is read-only
    pages_total, page, rows, pack, dp = cache.shape
    n_tok, hq, d = q.shape
    hkv = k.shape[1]
    merged = np.zeros((n_tok, rows * pack, dp), cache.dtype)
    merged[:, 0 : 2 * hkv : 2, :d] = k
    merged[:, 1 : 2 * hkv : 2, :d] = v
    merged = merged.reshape(n_tok, rows, pack, dp)
    pps = page_indices.shape[0] // kv_lens.shape[0]
    out = np.zeros((n_tok, hq, d), np.float32)
    group = hq // hkv
    for i in range(int(distribution[2])):
        q0, q1, kv_len = int(cu_q_lens[i]), int(cu_q_lens[i + 1]), int(kv_lens[i])
        q_len = q1 - q0
        pages = page_indices[i * pps : i * pps + -(-kv_len // page)]
        flat = cache[pages].reshape(-1, rows, pack, dp)
        flat[kv_len - q_len : kv_len] = merged[q0:q1]
        cache[pages] = flat.reshape(len(pages), page, rows, pack, dp)
        kv = flat.reshape(-1, rows * pack, dp)[:kv_len].astype(np.float32)
        keys, vals = kv[:, 0 : 2 * hkv : 2, :d], kv[:, 1 : 2 * hkv : 2, :d]
        q_pos = kv_len - q_len + np.arange(q_len)[:, None]
        k_pos = np.arange(kv_len)[None, :]
        allowed = k_pos <= q_pos if use_causal_mask else np.ones((q_len, kv_len), bool)
        if sliding_window is not None:
            allowed &= q_pos < k_pos + sliding_window
        qs = np.asarray(q[q0:q1], np.float32)
        for h in range(hq):
            logits = qs[:, h] @ keys[:, h // group].T * sm_scale
            if soft_cap is not None:
                logits = soft_cap * np.tanh(logits / soft_cap)
            logits = np.where(allowed, logits, -np.inf)
            w = np.exp(logits - logits.max(axis=-1, keepdims=True))
            out[q0:q1, h] = (w / w.sum(axis=-1, keepdims=True)) @ vals[:, h // group]
    return out, cache


class RecordingReference:
    """The RPA v3 kernel's stand-in, called where the Pallas kernel would be.

    At trace time (once per compiled shape: the layers of one step share the trace) it records
    the keyword arguments of the call and the shapes a per-token-bucket check needs, and runs
    upstream's own ``static_validate_inputs`` with every keyword argument, so a value the
    Pallas kernel would reject fails here too. At run time ``jax.pure_callback`` computes the
    attention on the host (``numpy_rpa``) and counts the calls; with ``check_reference`` the
    first call of each kind (decode, prefill, mixed) is also run through tpu-inference's
    ``ref_ragged_paged_attention`` and both results are kept (``checks``).

    The Pallas kernel itself cannot run on CPU (not even in interpret mode), and called without
    a VMEM limit it asks ``pltpu.get_tpu_info()``, which raises on CPU
    (kernels/ragged_paged_attention/v3/kernel.py, ragged_paged_attention).

    ``sm_scale_factor`` != 1 makes a deliberately wrong kernel (the negative control).
    """

    CHECK_TOLERANCE = 3e-2  # float32 NumPy against the reference's bfloat16 logits and softmax

    def __init__(
        self, path: str, sm_scale_factor: float = 1.0, check_reference: bool = False
    ) -> None:
        self.path = path
        self.sm_scale_factor = sm_scale_factor
        self.check_reference = check_reference
        self.calls: list[dict[str, Any]] = []
        self.runs: dict[str, int] = {"decode": 0, "prefill": 0, "mixed": 0}
        self.checks: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, **kw):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from tpu_inference.kernels.ragged_paged_attention.v3 import kernel as v3

        v3.static_validate_inputs(
            q,
            k,
            v,
            kv_cache,
            kv_lens,
            page_indices,
            cu_q_lens,
            distribution,
            **{n: x for n, x in kw.items() if n != "update_kv_cache"},
        )
        self.calls.append(
            {
                "path": self.path,
                "kwargs": {n: (list(x) if isinstance(x, tuple) else x) for n, x in kw.items()},
                "q_tokens": int(q.shape[0]),
                "q_heads": int(q.shape[1]),
                "kv_heads": int(k.shape[1]),
                "head_dim": int(q.shape[2]),
                "kv_cache_shape": list(kv_cache.shape),
                "max_num_seqs": int(kv_lens.shape[0]),
                "page_indices": int(page_indices.shape[0]),
            }
        )
        ref_kw = {n: x for n, x in kw.items() if n not in TUNING}
        if not ref_kw.pop("update_kv_cache", True):
            raise NotImplementedError("the reference always writes the KV cache")
        ref_kw["sm_scale"] = ref_kw.get("sm_scale", 1.0) * self.sm_scale_factor
        out_dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16

        def host(*arrays):
            arrays = [np.asarray(a) for a in arrays]
            out, cache = numpy_rpa(*arrays, **ref_kw)
            kv_lens_, _, cu, dist = arrays[4:]
            n = int(dist[2])
            kind = _kind(np.diff(cu[: n + 1]), kv_lens_[:n])
            with self._lock:
                self.runs[kind] += 1
                check = self.check_reference and not any(c["kind"] == kind for c in self.checks)
            if check:
                ref_out, ref_cache = v3.ref_ragged_paged_attention(
                    *(jnp.asarray(a) for a in arrays), **ref_kw
                )
                ref_out = np.asarray(ref_out, np.float32)
                rows = ref_out.shape[0]
                self.checks.append(
                    {
                        "kind": kind,
                        "tokens": rows,
                        "max_abs_diff": float(np.abs(out[:rows] - ref_out).max()),
                        "max_abs": float(np.abs(ref_out).max()),
                        "cache_equal": bool(np.array_equal(cache, np.asarray(ref_cache))),
                        "padding_zero": not np.any(out[rows:]),
                    }
                )
            return out.astype(out_dtype), cache

        shapes = (
            jax.ShapeDtypeStruct(q.shape, out_dtype),
            jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        )
        return jax.pure_callback(
            host, shapes, q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution
        )


HD64_TUNING = ("num_kv_pages_per_block", "num_queries_per_block", "vmem_limit_bytes")


def numpy_rpa_hd64(
    q,
    k,
    v,
    kv_cache,
    kv_lens,
    page_indices,
    cu_q_lens,
    distribution,
    sinks=None,
    *,
    sm_scale,
    sliding_window=None,
    soft_cap=None,
    q_scale=None,
    k_scale=None,
    v_scale=None,
):
    """What tpu-inference's ``ref_ragged_paged_attention_hd64`` computes, in NumPy: head h's K
    in lanes 0-63 and V in lanes 64-127 of row (h // packing, h % packing); per-head sinks take
    probability mass and contribute no value."""
    import numpy as np

    if q_scale is not None or k_scale is not None or v_scale is not None:
        raise NotImplementedError("quantized KV is not part of the end-to-end test")
    cache = np.array(kv_cache)
    _, page, rows, pack, lanes = cache.shape
    n_tok, hq, d = q.shape
    hkv = k.shape[1]
    merged = np.zeros((n_tok, rows * pack, lanes), cache.dtype)
    merged[:, :hkv, :d], merged[:, :hkv, d:] = k, v
    merged = merged.reshape(n_tok, rows, pack, lanes)
    pps = page_indices.shape[0] // kv_lens.shape[0]
    out = np.zeros((n_tok, hq, d), np.float32)
    group = hq // hkv
    for i in range(int(distribution[2])):
        q0, q1, kv_len = int(cu_q_lens[i]), int(cu_q_lens[i + 1]), int(kv_lens[i])
        q_len = q1 - q0
        pages = page_indices[i * pps : i * pps + -(-kv_len // page)]
        flat = cache[pages].reshape(-1, rows, pack, lanes)
        flat[kv_len - q_len : kv_len] = merged[q0:q1]
        cache[pages] = flat.reshape(len(pages), page, rows, pack, lanes)
        kv = flat.reshape(-1, rows * pack, lanes)[:kv_len, :hkv].astype(np.float32)
        q_pos = kv_len - q_len + np.arange(q_len)[:, None]
        k_pos = np.arange(kv_len)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= q_pos < k_pos + sliding_window
        qs = np.asarray(q[q0:q1], np.float32)
        for h in range(hq):
            logits = qs[:, h] @ kv[:, h // group, :d].T * sm_scale
            if soft_cap is not None:
                logits = soft_cap * np.tanh(logits / soft_cap)
            logits = np.where(allowed, logits, -np.inf)
            top = logits.max(axis=-1, keepdims=True)
            if sinks is not None:
                top = np.maximum(top, float(sinks[h]))
            e = np.exp(logits - top)
            total = e.sum(axis=-1, keepdims=True)
            if sinks is not None:
                total = total + np.exp(float(sinks[h]) - top)
            out[q0:q1, h] = (e / total) @ kv[:, h // group, d:]
    return out, cache


class RecordingReferenceHd64:
    """The hd64 kernel's stand-in: records each traced call's keywords and shapes, runs the hd64
    kernel's own ``static_validate_inputs`` with them, and computes ``numpy_rpa_hd64`` on the
    host (the Pallas kernel cannot run on CPU)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: list[dict[str, Any]] = []
        self.runs = 0

    def __call__(
        self, q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, sinks=None, **kw
    ):
        import jax
        import numpy as np
        from tpu_inference.kernels.ragged_paged_attention.v3 import kernel_hd64

        args = (q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)
        kernel_hd64.static_validate_inputs(*args, sinks, **kw)
        self.calls.append(
            {
                "path": self.path,
                "kwargs": dict(kw),
                "q_tokens": int(q.shape[0]),
                "q_heads": int(q.shape[1]),
                "kv_heads": int(k.shape[1]),
                "head_dim": int(q.shape[2]),
                "kv_cache_shape": list(kv_cache.shape),
            }
        )
        ref_kw = {n: x for n, x in kw.items() if n not in HD64_TUNING}

        def host(*arrays):
            self.runs += 1
            out, cache = numpy_rpa_hd64(*(np.asarray(a) for a in arrays), **ref_kw)
            return out.astype(q.dtype), cache

        shapes = (
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        )
        return jax.pure_callback(host, shapes, *args, *(() if sinks is None else (sinks,)))
