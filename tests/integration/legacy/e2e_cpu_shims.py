"""CPU stand-ins for the TPU-only parts of vLLM 0.13 + torch_xla 2.9 (end-to-end tests only).

Each shim names the upstream line it works around; the registry's adapter runs unchanged.
``install()`` must run before vLLM and torch_xla are imported.

The two Pallas kernels are replaced *under* the custom ops that call them, so vLLM's own
``PALLAS`` backend and the registry's subclass run the very same code: the seams of
``tpu_registry_vllm.kernel_binding`` keep their TPU defaults
(``torch.ops.xla.ragged_paged_attention`` and vLLM's ``write_to_kv_cache``). vLLM 0.13 traces
the model once with dynamo (even under ``enforce_eager``), so a Python stand-in bound at the
seam would be inlined into that single trace and never see a concrete call; an op stays a node
of the FX graph, and torch_xla's dynamo bridge calls its XLA implementation again for every new
input shape (token bucket). That is where ``RecordingKernels`` records each compiled call with
its concrete shapes and keyword arguments. The stand-ins build XLA graphs, so they must be
dense and static-shaped: no Python value may be read from a tensor.
"""

from __future__ import annotations

import sys
import types
from typing import Any

FAKE_LIBTPU_PATH = "/nonexistent/libtpu.so"
HBM_BYTES = (
    16 * 1024**3
)  # what the shim reports for the CPU "chip"; the KV cache size is pinned anyway


def install() -> None:
    # vllm/platforms/__init__.py, tpu_platform_plugin(): `import libtpu` decides whether vLLM
    # takes its TPU platform (vllm/platforms/tpu.py, TpuPlatform, which the PALLAS backend and
    # the TPU worker belong to), and torch_xla/__init__.py, _setup_tpu_vm_library_path(), calls
    # `libtpu.get_library_path()`. A stand-in module answers both; PJRT_DEVICE=CPU keeps
    # torch_xla from ever loading the (nonexistent) library.
    libtpu = types.ModuleType("libtpu")
    libtpu.get_library_path = lambda: FAKE_LIBTPU_PATH  # type: ignore[attr-defined]
    sys.modules["libtpu"] = libtpu

    # vllm/platforms/tpu.py: `from tpu_info import device` at import, and
    # TpuPlatform.get_device_name(): `device.get_local_chips()` (the tpu-info package, which
    # reads the PCI bus; not installed in this environment).
    tpu_info = types.ModuleType("tpu_info")
    device = types.ModuleType("tpu_info.device")
    chip = types.SimpleNamespace(name="v6e")
    device.get_local_chips = lambda: (chip, 1)  # type: ignore[attr-defined]
    tpu_info.device = device  # type: ignore[attr-defined]
    sys.modules["tpu_info"] = tpu_info
    sys.modules["tpu_info.device"] = device

    # vllm/v1/worker/tpu_worker.py, TPUWorker.init_device(): `os.environ["PJRT_DEVICE"] =
    # "TPU"` before `xm.xla_device()`. torch_xla reads PJRT_DEVICE once, when its runtime
    # client is created: create it now, on XLA:CPU, so the worker's later assignment has no
    # effect.
    import torch_xla
    import torch_xla.runtime as xr

    torch_xla.device()
    if xr.device_type() != "CPU":
        raise RuntimeError(f"expected the XLA:CPU runtime, got {xr.device_type()}")

    # vllm/v1/worker/tpu_worker.py, TPUWorker.determine_available_memory():
    # `xm.get_memory_info(self.device)`, which XLA:CPU does not implement ("GetAllocatorStats
    # is not supported"). The KV cache size is pinned with num_gpu_blocks_override; this only
    # feeds the memory check before the override applies.
    import torch_xla.core.xla_model as xm

    xm.get_memory_info = lambda device=None: {
        "bytes_limit": HBM_BYTES,
        "bytes_used": 0,
        "peak_bytes_used": 0,
    }


def dense_ragged_paged_attention(
    q,
    kv_pages,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale=1.0,
    sliding_window=None,
    soft_cap=None,
    mask_value=None,
    k_scale=None,
    v_scale=None,
    use_kernel=True,
    num_kv_pages_per_block=None,
    num_queries_per_block=None,
    vmem_limit_bytes=None,
    sm_scale_factor=1.0,
):
    """What torch_xla's ``ragged_paged_attention`` computes (its non-kernel path, the Pallas
    kernel's reference), dense and static-shaped, float32 math.

    q: [T, Hq, D]; kv_pages: [P, page, 2 * Hkv, D], K at even, V at odd combined heads;
    kv_lens: [S]; page_indices: [S, pages_per_seq]; cu_q_lens: [S + 1]; num_seqs: [1].
    Rows past ``cu_q_lens[num_seqs]`` (padding) are zero.
    """
    import torch

    del (
        mask_value,
        use_kernel,
        num_kv_pages_per_block,
        num_queries_per_block,
        vmem_limit_bytes,
    )  # tuning only
    n_tok, hq, d = q.shape
    _, page, combined, _ = kv_pages.shape
    hkv = combined // 2
    group = hq // hkv
    max_seqs, pps = page_indices.shape
    span = pps * page
    dev = q.device
    kv = kv_pages.index_select(0, page_indices.reshape(-1)).reshape(max_seqs, span, combined, d)
    keys, vals = kv[:, :, 0::2, :], kv[:, :, 1::2, :]

    t = torch.arange(n_tok, device=dev, dtype=torch.int32)
    live = torch.arange(max_seqs, device=dev, dtype=torch.int32) < num_seqs.reshape(
        1
    )  # cu_q_lens past num_seqs is padding (vLLM 0.13 fills it with 1)
    seq = (
        ((cu_q_lens[1:].unsqueeze(0) <= t.unsqueeze(1)) & live.unsqueeze(0))
        .sum(dim=1)
        .clamp(max=max_seqs - 1)
    )  # [T]
    valid = t < cu_q_lens.index_select(0, num_seqs.reshape(1).to(torch.int64))  # [T]
    q_start = cu_q_lens.index_select(0, seq)
    q_len = cu_q_lens.index_select(0, seq + 1) - q_start
    kv_len = kv_lens.index_select(0, seq)
    pos = kv_len - q_len + (t - q_start)  # the token's position in its sequence
    k_tok = keys.index_select(0, seq).float()  # [T, span, Hkv, D]
    v_tok = vals.index_select(0, seq).float()

    logits = torch.einsum("tkgd,tlkd->tkgl", q.float().reshape(n_tok, hkv, group, d), k_tok) * (
        sm_scale * sm_scale_factor
    )
    if k_scale is not None:
        logits = logits * k_scale
    if soft_cap is not None:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    col = torch.arange(span, device=dev, dtype=torch.int32).unsqueeze(0)
    allowed = (col <= pos.unsqueeze(1)) & (col < kv_len.unsqueeze(1))
    if sliding_window is not None:
        allowed = allowed & (pos.unsqueeze(1) - col < sliding_window)
    logits = torch.where(allowed[:, None, None, :], logits, torch.full_like(logits, -1e30))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("tkgl,tlkd->tkgd", probs, v_tok).reshape(n_tok, hq, d)
    if v_scale is not None:
        out = out * v_scale
    out = torch.where(valid[:, None, None], out, torch.zeros_like(out))
    return out.to(q.dtype)


def dense_kv_cache_update(
    kv, slot_mapping, kv_cache, num_kv_update_slices, page_size, num_slices_per_block
):
    """What vLLM's Pallas ``kv_cache_update`` kernel does, dense and static-shaped.

    kv: [tokens, 2 * Hkv, D] (K and V interleaved per head); kv_cache: [P * page, 2 * Hkv, D];
    slot_mapping: [3, padded_slices] rows (kv_cache_start, new_kv_start, length); only the
    first ``num_kv_update_slices`` slices count. Returns the new cache.
    """
    import torch

    del num_slices_per_block  # the Pallas kernel's grid; no effect on the result
    dev = kv.device
    n_slots = kv_cache.shape[0]
    padded = slot_mapping.shape[1]
    j = torch.arange(page_size, device=dev, dtype=torch.int32).unsqueeze(0)
    i = torch.arange(padded, device=dev, dtype=torch.int32).unsqueeze(1)
    start, src0, length = (
        slot_mapping[0].unsqueeze(1),
        slot_mapping[1].unsqueeze(1),
        slot_mapping[2].unsqueeze(1),
    )
    valid = (i < num_kv_update_slices.reshape(1, 1)) & (j < length)
    dst = torch.where(valid, start + j, torch.full_like(start + j, n_slots)).reshape(
        -1
    )  # invalid: a scratch row
    src = (
        torch.where(valid, src0 + j, torch.zeros_like(src0 + j))
        .clamp(max=kv.shape[0] - 1)
        .reshape(-1)
    )
    scratch = torch.zeros((1, *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=dev)
    extended = torch.cat([kv_cache, scratch]).index_copy(
        0, dst.to(torch.int64), kv.index_select(0, src).to(kv_cache.dtype)
    )
    return extended[:n_slots]


class RecordingKernels:
    """Installs the stand-ins under torch_xla's and vLLM's custom ops and records every call
    the dynamo bridge makes (one per compiled shape), with its keyword arguments and shapes."""

    def __init__(self, sm_scale_factor: float = 1.0) -> None:
        self.sm_scale_factor = sm_scale_factor
        self.calls: list[dict[str, Any]] = []
        self.kv_updates: list[dict[str, Any]] = []

    def install(self) -> None:
        import torch_xla.experimental.custom_kernel as custom_kernel
        import vllm.v1.attention.backends.pallas as pallas

        # torch_xla/experimental/custom_kernel.py, ragged_paged_attention_xla (the XLA
        # implementation of torch.ops.xla.ragged_paged_attention) calls the module's
        # ragged_paged_attention(), which runs the Pallas kernel for use_kernel=True: "Only
        # interpret mode is supported on CPU backend".
        custom_kernel.ragged_paged_attention = self.ragged_paged_attention
        # vllm/v1/attention/backends/pallas.py, kv_cache_update_op_xla (the XLA implementation
        # of torch.ops.xla.kv_cache_update_op, which write_to_kv_cache calls) calls the
        # module's kv_cache_update_op_impl(), which runs the Pallas kv_cache_update kernel.
        pallas.kv_cache_update_op_impl = self.kv_cache_update

    def ragged_paged_attention(self, q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **kw):
        self.calls.append(
            {
                "kwargs": dict(kw),
                "q_tokens": int(q.shape[0]),
                "q_heads": int(q.shape[1]),
                "kv_heads": int(kv_pages.shape[2]) // 2,
                "head_dim": int(q.shape[2]),
                "kv_cache_shape": list(kv_pages.shape),
                "max_num_seqs": int(page_indices.shape[0]),
                "pages_per_seq": int(page_indices.shape[1]),
            }
        )
        return dense_ragged_paged_attention(
            q,
            kv_pages,
            kv_lens,
            page_indices,
            cu_q_lens,
            num_seqs,
            **kw,
            sm_scale_factor=self.sm_scale_factor,
        )

    def kv_cache_update(
        self, kv, slot_mapping, kv_cache, num_kv_update_slices, page_size, num_slices_per_block
    ):
        self.kv_updates.append(
            {
                "tokens": int(kv.shape[0]),
                "slices": int(slot_mapping.shape[1]),
                "page_size": int(page_size),
            }
        )
        return dense_kv_cache_update(
            kv, slot_mapping, kv_cache, num_kv_update_slices, page_size, num_slices_per_block
        )
