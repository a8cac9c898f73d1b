"""From a vLLM configuration to the registry's resolved configuration, and the log line."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tpu_registry import SINK_MODEL_TYPES, ResolvedConfig, Workload, plan, resolve

log = logging.getLogger("vllm.tpu_registry_vllm")  # under vLLM's logger, so its handler prints it

_CACHE_DTYPES = {
    "auto": None,
    "bfloat16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "int8": "int8",
}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def workload_from_vllm(vllm_config: Any) -> Workload:
    """The attention shape and serving limits vLLM is about to use."""
    mc, sc, cc, pc = (
        vllm_config.model_config,
        vllm_config.scheduler_config,
        vllm_config.cache_config,
        vllm_config.parallel_config,
    )
    q_dtype = _dtype_name(mc.dtype)
    kv_dtype = _CACHE_DTYPES.get(str(cc.cache_dtype), None) or q_dtype
    user_block = getattr(cc, "user_specified_block_size", False)
    window = (
        getattr(mc.hf_text_config, "sliding_window", None)
        if hasattr(mc, "hf_text_config")
        else None
    )
    text = getattr(mc, "hf_text_config", None)
    shape: dict[str, Any] = {
        "num_kv_heads": max(mc.get_total_num_kv_heads(), 1),
        "head_dim": mc.get_head_size(),
    }
    if getattr(mc, "use_mla", False):  # one latent per token: tpu-inference's MLA kernel
        lora, rope = text.kv_lora_rank, text.qk_rope_head_dim
        shape = {
            "num_kv_heads": 1,
            "head_dim": lora + rope,
            "kv_lora_rank": lora,
            "qk_rope_head_dim": rope,
        }
    elif getattr(text, "model_type", None) in SINK_MODEL_TYPES:
        shape["attention_sinks"] = True
    return Workload(
        num_q_heads=mc.get_num_attention_heads(pc) * pc.tensor_parallel_size,
        **shape,
        q_dtype=q_dtype,
        kv_dtype=kv_dtype,
        max_model_len=mc.max_model_len,
        max_num_seqs=sc.max_num_seqs,
        max_num_batched_tokens=sc.max_num_batched_tokens,
        page_size=cc.block_size if user_block and cc.block_size else None,
        sliding_window=window if isinstance(window, int) and window > 0 else None,
        tensor_parallel=pc.tensor_parallel_size,
    )


def resolve_for_vllm(vllm_config: Any) -> ResolvedConfig:
    return resolve(workload_from_vllm(vllm_config))


def log_line(cfg: ResolvedConfig, *, family: str, extra: Sequence[str] = ()) -> str:
    """One line: generation and how it was found; page size, block sizes, VMEM, each with its layer.

    ``extra``: further phrases appended as they are (e.g. what happened to exported variables).
    """
    d = cfg.detection

    def knob(name: str) -> str:
        k = cfg.knobs.get(name)
        if k is None:
            return f"{name.split('.')[-1]}=-"
        v = ",".join(map(str, k.value)) if isinstance(k.value, tuple) else k.value
        return f"{name.split('.')[-1]}={v} [{k.layer}]"

    parts = [f"tpu-registry: {cfg.spec.id} ({d.status}: {d.reason})", knob("page_size")]
    parts += [knob(name) for name in LOGGED.get(family, ())]
    parts += list(extra)
    return "; ".join(parts)


# The knobs the start-up line shows per kernel family.
LOGGED = {
    "rpa_v3": (
        "rpa_v3.d_block_sizes",
        "rpa_v3.p_block_sizes",
        "rpa_v3.m_block_sizes",
        "rpa_v3.vmem_limit_bytes",
    ),
    "rpa_v3_hd64": (
        "rpa_v3_hd64.num_kv_pages_per_block",
        "rpa_v3_hd64.num_queries_per_block",
        "rpa_v3_hd64.vmem_limit_bytes",
    ),
    "mla_v2": (
        "mla_v2.decode_kv_pages_per_block",
        "mla_v2.decode_batch_size",
        "mla_v2.mixed_queries_per_block",
        "mla_v2.vmem_limit_bytes",
    ),
    "rpa_v2": (
        "rpa_v2.num_kv_pages_per_block",
        "rpa_v2.num_queries_per_block",
        "rpa_v2.vmem_limit_bytes",
    ),
}


def tpu_inference_family(cfg: ResolvedConfig) -> str:
    """The tpu-inference kernel family that runs this configuration's attention."""
    families = plan(cfg).families
    return next((f for f in ("mla_v2", "rpa_v3_hd64", "rpa_v3") if f in families), "rpa_v3")
