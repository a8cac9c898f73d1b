"""vLLM 0.11.2 - 0.13 on torch_xla: ``PALLAS`` with the registry's RPA v2 knobs.

``register()`` points ``AttentionBackendEnum.PALLAS`` at ``RegistryPallasBackend``. Its impl
does what vLLM's ``PallasAttentionBackendImpl.forward`` does (head dim padded to a multiple of
128 and no further, the KV-cache write, the kernel call, the padding stripped) but passes the
registry's ``num_kv_pages_per_block``, ``num_queries_per_block`` and ``vmem_limit_bytes``
instead of leaving them to torch_xla (which asks for 120 MiB of VMEM even on 16 MiB cores).

Knobs are resolved once per impl, for that impl's heads, head dim, window and KV dtype and the
serving limits of the vLLM config current while the model is built (else from the first
call's tensors). They are not resolved per call: vLLM 0.13 compiles the model with dynamo and a
symbolic token count, and choosing knobs from it in Python would specialise the graph
(ConstraintViolationError); torch_xla clamps ``num_queries_per_block`` to each call's tokens
itself. vLLM 0.13 fixes the page size itself and calls the base class's statics, so
the adapter tunes for the page size vLLM uses and says when the registry would choose another.
Kernels are called through ``kernel_binding`` so tests on CPU can bind reference code.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

import torch
from vllm.attention.backends.abstract import AttentionType
from vllm.v1.attention.backends.pallas import (
    TPU_HEAD_SIZE_ALIGNMENT,
    PallasAttentionBackend,
    PallasAttentionBackendImpl,
    PallasMetadata,
)

from tpu_registry import ResolvedConfig, Workload, cdiv, resolve

from . import kernel_binding
from .vllm_config import _CACHE_DTYPES, log_line, workload_from_vllm

FAMILY = "rpa_v2"
BACKEND_PATH = f"{__name__}.RegistryPallasBackend"
KNOBS = ("num_kv_pages_per_block", "num_queries_per_block", "vmem_limit_bytes")

log = logging.getLogger("vllm.tpu_registry_vllm")  # under vLLM's logger, so its handler prints it
_logged: set[str] = set()
_log_lock = threading.Lock()


def register() -> bool:
    """Make ``AttentionBackendEnum.PALLAS`` resolve to ``RegistryPallasBackend``. Idempotent.

    Leaves an override someone else registered in place (and says so); returns whether
    ``PALLAS`` now points here.
    """
    from vllm.attention.backends.registry import AttentionBackendEnum, register_backend

    member = AttentionBackendEnum.PALLAS
    if member.is_overridden() and member.get_path() != BACKEND_PATH:
        log.warning(
            "tpu-registry: PALLAS is already overridden by %s; not replacing it", member.get_path()
        )
        return False
    register_backend(
        member, class_path=BACKEND_PATH
    )  # keyword: the positional order changed between versions
    return True


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def workload_for_impl(
    vllm_config: Any,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    sliding_window: int | None,
    kv_cache_dtype: str,
) -> Workload:
    """The workload one attention impl serves: its own shape, the config's serving limits.

    The impl's head counts are per device. The model-wide workload from the config is used
    when its per-device view matches them (so the tensor-parallel degree is kept); otherwise
    the per-device shape is used with ``tensor_parallel=1``, which tunes identically.
    """
    base = workload_from_vllm(vllm_config)
    kv_dtype = _CACHE_DTYPES.get(str(kv_cache_dtype), None) or base.q_dtype
    w = replace(
        base,
        head_dim=head_size,
        sliding_window=sliding_window or None,
        kv_dtype=kv_dtype,
        page_size=vllm_config.cache_config.block_size or None,
    )
    if (w.q_heads_per_device, w.kv_heads_per_device) != (num_heads, num_kv_heads):
        w = replace(w, num_q_heads=num_heads, num_kv_heads=num_kv_heads, tensor_parallel=1)
    return w


def workload_from_tensors(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    sliding_window: int | None,
) -> Workload:
    """Fallback when no vLLM config was current: limits read from the first call's tensors."""
    page = int(kv_cache.shape[1])
    return Workload(
        num_q_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_size,
        q_dtype=_dtype_name(query.dtype),
        kv_dtype=_dtype_name(kv_cache.dtype),
        max_model_len=int(block_tables.shape[1]) * page,
        max_num_seqs=int(block_tables.shape[0]),
        max_num_batched_tokens=int(query.shape[0]),
        page_size=page,
        sliding_window=sliding_window or None,
    )


def _log_once(line: str, level: int = logging.INFO) -> None:
    with _log_lock:
        if line in _logged:
            return
        _logged.add(line)
    log.log(level, "%s", line)


class RegistryPallasBackendImpl(PallasAttentionBackendImpl):
    """vLLM's Pallas impl with the registry's RPA v2 knobs."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: int | None = None,
    ) -> None:
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads,
            alibi_slopes,
            sliding_window,
            kv_cache_dtype,
            logits_soft_cap,
            attn_type,
            kv_sharing_target_layer_name,
        )
        self.head_size_padded = cdiv(head_size, TPU_HEAD_SIZE_ALIGNMENT) * TPU_HEAD_SIZE_ALIGNMENT
        self.registry_config: ResolvedConfig | None = None
        self.kernel_kwargs: dict[str, int | None] | None = None  # None: not resolved yet
        for family in (FAMILY, "kv_cache_update"):
            kernel_binding.kernel(family)  # load the defaults now, not inside the traced forward
        vllm_config = _current_vllm_config()
        if vllm_config is not None and getattr(vllm_config, "model_config", None) is not None:
            self._resolve(
                lambda: workload_for_impl(
                    vllm_config,
                    num_heads=num_heads,
                    num_kv_heads=num_kv_heads,
                    head_size=head_size,
                    sliding_window=sliding_window,
                    kv_cache_dtype=kv_cache_dtype,
                ),
                vllm_config,
            )

    def _resolve(self, make_workload, vllm_config: Any = None) -> None:
        """Resolve once; on any failure fall back to upstream's choice (``None`` knobs), loudly."""
        try:
            w = make_workload()
            cfg = resolve(w)
        except Exception as e:  # noqa: BLE001 - a tuning failure must not stop serving
            self.kernel_kwargs = dict.fromkeys(KNOBS)
            _log_once(
                f"tpu-registry: cannot resolve RPA v2 knobs ({type(e).__name__}: {e}); torch_xla "
                "chooses them as upstream does",
                logging.WARNING,
            )
            return
        kwargs = cfg.kernel_kwargs(FAMILY)
        self.registry_config = cfg
        if set(kwargs) != set(KNOBS):
            self.kernel_kwargs = dict.fromkeys(KNOBS)
            _log_once(
                f"tpu-registry: {cfg.spec.id} has no rpa_v2 knobs "
                f"({', '.join(cfg.spec.kernels.families) or 'no kernel families'}); torch_xla "
                "chooses them as upstream does",
                logging.WARNING,
            )
            return
        notes = []
        most = _most_model_len(vllm_config)
        if most is not None and w.page_size:
            # VLLM_TPU_MOST_MODEL_LEN gives some calls a narrower block table; the kernel
            # rejects more KV pages per block than the table has.
            cap = cdiv(most, w.page_size)
            if kwargs["num_kv_pages_per_block"] > cap:
                kwargs["num_kv_pages_per_block"] = cap
                notes.append(
                    f"num_kv_pages_per_block capped at {cap} for VLLM_TPU_MOST_MODEL_LEN={most}"
                )
        self.kernel_kwargs = kwargs
        preferred = _preferred_page_size(w)
        if preferred is not None and preferred != w.page_size:
            notes.append(
                f"vLLM fixes the page size at {w.page_size}; the registry would choose {preferred}"
            )
        hd = cfg.value("head_dim_padded")
        if hd is not None and hd != self.head_size_padded:
            notes.append(
                f"KV cache head dim is {self.head_size_padded} (vLLM's layout); registry "
                f"head_dim_padded {hd} not applied"
            )
        line = (
            log_line(cfg, family=FAMILY)
            + (f"; head_dim {w.head_dim}->{self.head_size_padded}")
            + "".join(f"; {n}" for n in notes)
        )
        _log_once(line)

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: PallasMetadata,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(
                "fused output quantization is not supported by the tpu-registry Pallas backend"
            )
        if kv_cache.numel() == 0:  # vLLM's memory-profiling call
            return torch.ones_like(query) if output is None else output
        if self.kernel_kwargs is None:
            self._resolve(
                lambda: workload_from_tensors(
                    query,
                    kv_cache,
                    attn_metadata.block_tables,
                    num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads,
                    head_size=self.head_size,
                    sliding_window=self.sliding_window,
                )
            )
        assert self.kernel_kwargs is not None

        num_tokens, hidden_size = query.shape
        query = query.view(num_tokens, self.num_heads, self.head_size)
        key = key.view(-1, self.num_kv_heads, self.head_size)
        value = value.view(-1, self.num_kv_heads, self.head_size)
        pad = self.head_size_padded - self.head_size  # to the next multiple of 128, never beyond
        if pad:
            query = torch.nn.functional.pad(query, (0, pad), value=0.0)
            key = torch.nn.functional.pad(key, (0, pad), value=0.0)
            value = torch.nn.functional.pad(value, (0, pad), value=0.0)

        if self.kv_sharing_target_layer_name is None:
            kernel_binding.kernel("kv_cache_update")(
                key,
                value,
                kv_cache,
                attn_metadata.slot_mapping,
                attn_metadata.num_slices_per_kv_cache_update_block,
                attn_metadata.num_kv_update_slices,
                self.kv_cache_quantized_dtype,
                layer._k_scale_float,
                layer._v_scale_float,
            )
        if self.kv_cache_quantized_dtype is not None and (
            layer._k_scale_float == 0.0 or layer._v_scale_float == 0.0
        ):
            raise ValueError("k_scale_float and v_scale_float must be non-zero")

        out = kernel_binding.kernel(FAMILY)(
            query,
            kv_cache,
            attn_metadata.context_lens,
            attn_metadata.block_tables,
            attn_metadata.query_start_loc,
            attn_metadata.num_seqs,
            **self.kernel_kwargs,
            use_kernel=True,
            sm_scale=self.scale,
            sliding_window=self.sliding_window,
            soft_cap=self.logits_soft_cap,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
        )
        if pad:
            out = out[:, :, : self.head_size]
        return out.reshape(num_tokens, hidden_size)


class RegistryPallasBackend(PallasAttentionBackend):
    """``PALLAS`` with the registry-driven impl. The name stays ``PALLAS`` (an enum member)."""

    @staticmethod
    def get_impl_cls() -> type[RegistryPallasBackendImpl]:
        return RegistryPallasBackendImpl


def _current_vllm_config() -> Any:
    """The config vLLM set while building the model, or None. (``get_current_vllm_config()``
    would build a default ``VllmConfig`` instead, which fails off-TPU and tunes for nothing.)"""
    import vllm.config.vllm as vllm_config_module

    return getattr(vllm_config_module, "_current_vllm_config", None)


def _most_model_len(vllm_config: Any) -> int | None:
    if vllm_config is None:
        return None
    import vllm.envs as envs

    return getattr(envs, "VLLM_TPU_MOST_MODEL_LEN", None)


def _preferred_page_size(w: Workload) -> int | None:
    try:
        return resolve(replace(w, page_size=None)).value("page_size")
    except Exception:  # noqa: BLE001 - only for the start-up line
        return None
