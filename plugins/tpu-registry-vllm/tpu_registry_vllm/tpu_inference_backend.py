"""The tpu-inference adapter: vLLM >= 0.14 with tpu-inference (tested with 0.32 / 0.32).

- ``register()`` adds the ``TPU_REGISTRY`` attention backend through tpu-inference's
  ``register_attention_backend`` (``--attention-backend TPU_REGISTRY``). ``FLASH_ATTN`` is
  left alone.
- ``RegistryAttentionBackend`` is tpu-inference's kind of backend (KV cache layout + the
  attention computation). Its ``attention()`` calls the RPA v3 kernel through
  ``kernel_binding.kernel("rpa_v3")``, or for head dim 64 (attention sinks included) the hd64
  kernel through ``kernel_binding.kernel("rpa_v3_hd64")``, with the registry's block sizes and
  VMEM limit for that call; its KV cache shape comes from the registry's attention plan.
  Calls upstream's hd64 path refuses (KV sharing, bidirectional attention, sinks at other head
  dims), context parallelism and the experimental batched kernel go to tpu-inference's own
  RPA path unchanged. MLA layers never reach a registered backend (tpu-inference always runs
  ``FLASH_ATTN_MLA`` for them); the platform gives them the registry's page size.
- ``activate(vllm_config)`` resolves the registry for this engine once per process, exports
  ``RPA_V3_*_BLOCK_SIZES`` for models tpu-inference runs as JAX modules (never over a value the
  user set) and logs the one start-up line. The platform plugin calls it; the vLLM attention
  layer calls it too, so a process that skipped the platform still gets a configuration.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from tpu_inference.layers.common.attention_backend import AttentionBackend, RPAAttentionBackend

from tpu_registry import ResolvedConfig, canonical_dtype, rpa_v3_rejection
from tpu_registry import kv_cache_shape as plan_kv_cache_shape

from . import BACKEND_NAME, kernel_binding
from .registry_plugin import ENV_EXPORT, ENV_EXPORTED
from .vllm_config import log, log_line, resolve_for_vllm, tpu_inference_family

NAME = BACKEND_NAME.lower()  # tpu-inference keys registered backends by the lower-case name
VLLM_BACKEND = "tpu_registry_vllm.tpu_inference_vllm.TpuRegistryBackend"
FAMILY = "rpa_v3"
HD64 = "rpa_v3_hd64"
# The tuning keywords of tpu-inference's v3 kernel, in the registry's knob names.
KERNEL_TUNING = ("d_block_sizes", "p_block_sizes", "m_block_sizes", "vmem_limit_bytes")
# Variables tpu-inference's own call sites read (attention_interface.rpa_block_size_kwargs).
BLOCK_SIZE_ENV = {
    "RPA_V3_DECODE_BLOCK_SIZES": "rpa_v3.d_block_sizes",
    "RPA_V3_PREFILL_BLOCK_SIZES": "rpa_v3.p_block_sizes",
    "RPA_V3_MIXED_BLOCK_SIZES": "rpa_v3.m_block_sizes",
}
_lock = threading.Lock()
_active: ResolvedConfig | None = None
_logged: set[str] = set()


def register() -> None:
    """Make ``--attention-backend TPU_REGISTRY`` run ``RegistryAttentionBackend``. Idempotent."""
    from tpu_inference.layers.common.attention_backend import register_attention_backend

    register_attention_backend(NAME, attention=RegistryAttentionBackend, vllm_backend=VLLM_BACKEND)


def selected(vllm_config: Any) -> bool:
    """Whether ``--attention-backend TPU_REGISTRY`` selected this backend."""
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return backend is not None and backend.name == BACKEND_NAME


# ----------------------------------------------------------------------------- configuration


def kernel_kwargs(cfg: ResolvedConfig) -> dict[str, Any]:
    """The registry's ``rpa_v3`` knobs that the v3 kernel takes, minus tuples it would reject."""
    out = {}
    page = cfg.value("page_size")
    for name, value in cfg.kernel_kwargs(FAMILY).items():
        if name not in KERNEL_TUNING:
            continue
        if name.endswith("_block_sizes") and rpa_v3_rejection(value, page):
            continue
        out[name] = value
    return out


def call_kwargs(
    cfg: ResolvedConfig, num_tokens: int, q_heads: int, kv_heads: int
) -> dict[str, Any]:
    """The kernel kwargs of one call: ``num_tokens`` padded tokens, one shard's heads."""
    return kernel_kwargs(cfg.for_call(num_tokens, q_heads=q_heads, kv_heads=kv_heads))


def export_block_sizes(cfg: ResolvedConfig, env: dict[str, str] | None = None) -> list[str]:
    """Set ``RPA_V3_*_BLOCK_SIZES`` from the registry unless the user set them. Returns one
    phrase per variable for the log line."""
    env = os.environ if env is None else env
    ours = dict(p.split("=", 1) for p in env.get(ENV_EXPORTED, "").split(";") if "=" in p)
    page = cfg.value("page_size")
    notes, exported = [], []
    for var, knob in BLOCK_SIZE_ENV.items():
        value = cfg.value(knob)
        if value is None:
            continue
        text = ",".join(map(str, value))
        current = env.get(var, "").strip()
        if current and ours.get(var) != current:
            notes.append(f"{var}={current} kept (set by the user)")
            continue
        why = rpa_v3_rejection(value, page)
        if why:
            env.pop(var, None)
            ours.pop(var, None)
            notes.append(f"{var} not exported ({why}; the kernel's default applies)")
            continue
        env[var] = text
        ours[var] = text
        exported.append(var.removeprefix("RPA_V3_").removesuffix("_BLOCK_SIZES").lower())
    if ours:
        env[ENV_EXPORTED] = ";".join(f"{k}={v}" for k, v in ours.items())
    if exported:
        notes.insert(
            0,
            f"RPA_V3_{{{','.join(exported).upper()}}}_BLOCK_SIZES exported (tpu-inference's own "
            "attention reads them: JAX-native models and its default backend; "
            f"{ENV_EXPORT}=off keeps its defaults)",
        )
    return notes


def activate(vllm_config: Any, *, export: bool = True) -> ResolvedConfig:
    """Resolve the registry for this engine, make it the process's configuration, export the
    block-size variables and log the start-up line (once per configuration and process)."""
    global _active
    cfg = resolve_for_vllm(vllm_config)
    with _lock:
        notes = []
        if export and os.environ.get(ENV_EXPORT, "on").strip().lower() in (
            "0",
            "off",
            "no",
            "false",
        ):
            notes.append(f"RPA_V3_*_BLOCK_SIZES not exported ({ENV_EXPORT}=off)")
        elif export:
            notes = export_block_sizes(cfg)
        page = cfg.value("page_size")
        for name in ("d_block_sizes", "p_block_sizes", "m_block_sizes"):
            value = cfg.value(f"{FAMILY}.{name}")
            why = value is not None and rpa_v3_rejection(value, page)
            if why:
                notes.append(f"{name} not passed to the kernel ({why}; its default applies)")
        _active = cfg
        line = log_line(cfg, family=tpu_inference_family(cfg), extra=notes)
        if line not in _logged:
            _logged.add(line)
            log.info("%s", line)
    return cfg


def active_config() -> ResolvedConfig:
    """The configuration ``attention()`` uses: the activated one, else one resolved from vLLM's
    current configuration."""
    if _active is not None:
        return _active
    from vllm.config import get_current_vllm_config

    vc = get_current_vllm_config()
    if getattr(vc, "model_config", None) is None:
        raise RuntimeError(
            f"--attention-backend {BACKEND_NAME}: no tpu-registry configuration is active in this "
            "process (the tpu_registry platform plugin did not run); set VLLM_PLUGINS to include "
            "tpu_registry, or leave it unset"
        )
    return activate(vc, export=False)


# ----------------------------------------------------------------------------- the backend


def _delegate(q, sinks, mesh, update_kv_cache: bool, use_causal_mask: bool) -> str | None:
    """Why this call goes to tpu-inference's own RPA path (None: it runs through the seam).
    Mirrors ``sharded_ragged_paged_attention``'s dispatch: what it refuses for head dim 64
    (or sinks elsewhere) it refuses with its own message."""
    from tpu_inference import envs

    if any(mesh.shape.get(axis, 1) > 1 for axis in ("dcp", "pcp")):
        return "context parallelism has its own kernels"
    if q.shape[-1] == 64:
        if not update_kv_cache:
            return "the hd64 kernel has no KV sharing (upstream raises)"
        if not use_causal_mask:
            return "the hd64 kernel has no bidirectional attention (upstream raises)"
        return None
    if sinks is not None:
        return "attention sinks need head dim 64 (upstream raises)"
    if envs.USE_BATCHED_RPA_KERNEL:
        return "USE_BATCHED_RPA_KERNEL selects the experimental batched kernel"
    return None


class RegistryAttentionBackend(AttentionBackend):
    """tpu-inference attention backend whose kernel knobs come from tpu-registry."""

    name = NAME

    def __init__(self, config: ResolvedConfig | None = None) -> None:
        self._config = config

    @property
    def config(self) -> ResolvedConfig:
        return self._config if self._config is not None else active_config()

    def get_kv_cache_shape(
        self, total_num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, kv_dtype: Any
    ) -> tuple[int, ...]:
        import jax.numpy as jnp  # the plan knows both layouts, the hd64 kernel's included

        dtype = canonical_dtype(jnp.dtype(kv_dtype).name)
        return plan_kv_cache_shape(
            "tpu_inference", total_num_pages, page_size, num_kv_heads, head_dim, dtype
        )

    def attention(
        self,
        kv_cache,
        q,
        k,
        v,
        md,
        shared_md,
        mesh,
        *,
        head_dim_original: int,
        sm_scale: float,
        attention_chunk_size: int | None,
        q_scale: float | None,
        k_scale: float | None,
        v_scale: float | None,
        sinks,
        update_kv_cache: bool,
        use_causal_mask: bool,
        attn_logits_soft_cap: float | None,
        decode_query_size: int,
    ):
        common = dict(
            head_dim_original=head_dim_original,
            sm_scale=sm_scale,
            attention_chunk_size=attention_chunk_size,
            q_scale=q_scale,
            k_scale=k_scale,
            v_scale=v_scale,
            sinks=sinks,
            update_kv_cache=update_kv_cache,
            use_causal_mask=use_causal_mask,
            attn_logits_soft_cap=attn_logits_soft_cap,
            decode_query_size=decode_query_size,
        )
        if _delegate(q, sinks, mesh, update_kv_cache, use_causal_mask):
            return RPAAttentionBackend().attention(kv_cache, q, k, v, md, shared_md, mesh, **common)
        # The arrays as the kernels take them, and the layer's settings both kernels share.
        arrays = (
            q,
            k,
            v,
            kv_cache,
            shared_md.seq_lens,
            md.block_tables,
            shared_md.query_start_loc,
            shared_md.request_distribution,
        )
        layer = dict(
            config=self.config,
            sm_scale=sm_scale,
            sliding_window=attention_chunk_size,
            soft_cap=attn_logits_soft_cap,
            q_scale=q_scale,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        if q.shape[-1] == 64:
            output, kv_cache = _sharded_rpa_hd64(mesh, *arrays, sinks, **layer)
        else:
            output, kv_cache = _sharded_rpa_v3(
                mesh,
                *arrays,
                **layer,
                update_kv_cache=update_kv_cache,
                use_causal_mask=use_causal_mask,
            )
        return kv_cache, output


def _replicate_kv(mesh, k, v):
    """Fewer KV heads than devices on the head axis: repeat them, as tpu-inference does."""
    import jax.numpy as jnp
    from tpu_inference.layers.common.sharding import ShardingAxisName as Axis
    from tpu_inference.utils import get_mesh_shape_product

    heads = get_mesh_shape_product(mesh, Axis.ATTN_HEAD)
    if heads > 1 and k.shape[1] < heads:
        if heads % k.shape[1]:
            raise ValueError(
                f"{heads} devices on the head axis do not divide into {k.shape[1]} KV heads"
            )
        factor = heads // k.shape[1]
        k, v = jnp.repeat(k, factor, axis=1), jnp.repeat(v, factor, axis=1)
    return k, v


def hd64_call_kwargs(
    cfg: ResolvedConfig, num_tokens: int, q_heads: int, kv_heads: int, sliding_window
) -> dict[str, Any]:
    """The hd64 kernel's tuning kwargs of one call: one shard's heads, the layer's window
    (the hd64 tables are keyed by it), the call's padded tokens."""
    call = cfg.for_call(
        num_tokens, q_heads=q_heads, kv_heads=kv_heads, sliding_window=sliding_window
    )
    return call.kernel_kwargs(HD64)


def _sharded_rpa_hd64(
    mesh,
    q,
    k,
    v,
    kv_cache,
    kv_lens,
    page_indices,
    cu_q_lens,
    distribution,
    sinks,
    *,
    config: ResolvedConfig,
    **kernel_args,
):
    """The hd64 kernel under ``shard_map``, sharded as tpu-inference shards it (sinks split
    across the head axis with the query heads); tuned per call at trace time."""
    import jax
    from jax.sharding import PartitionSpec as P
    from tpu_inference.layers.common.sharding import ShardingAxisName as Axis

    k, v = _replicate_kv(mesh, k, v)
    qkv = P(Axis.ATTN_DATA, Axis.ATTN_HEAD, None)
    cache = P(Axis.ATTN_DATA, None, Axis.ATTN_HEAD, None, None)
    meta = P(Axis.ATTN_DATA)
    in_specs = (qkv, qkv, qkv, cache, meta, meta, meta, meta)
    args = (q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)
    if sinks is not None:
        in_specs += (P(Axis.ATTN_HEAD),)
        args += (sinks,)
    kernel = kernel_binding.kernel(HD64)
    window = kernel_args["sliding_window"]

    def body(q, k, *rest):
        tuning = hd64_call_kwargs(config, q.shape[0], q.shape[1], k.shape[1], window)
        return kernel(q, k, *rest, **kernel_args, **tuning)

    return jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=(qkv, cache), check_vma=False
    )(*args)


def _sharded_rpa_v3(
    mesh,
    q,
    k,
    v,
    kv_cache,
    kv_lens,
    page_indices,
    cu_q_lens,
    distribution,
    *,
    config: ResolvedConfig,
    **kernel_args,
):
    """The v3 kernel under ``shard_map`` over tpu-inference's attention axes (KV heads split
    across the head axis, sequences across the data axis), as tpu-inference shards it.

    The tuning is resolved inside, at trace time, for the shapes of one shard and call: the
    padded token count (vLLM traces one graph per bucket) and the shard's heads, as upstream's
    ``get_default_block_sizes`` sizes blocks per call. It costs nothing at run time."""
    import jax
    from jax.sharding import PartitionSpec as P
    from tpu_inference.layers.common.sharding import ShardingAxisName as Axis

    k, v = _replicate_kv(mesh, k, v)
    qkv = P(Axis.ATTN_DATA, Axis.ATTN_HEAD, None)
    cache = P(Axis.ATTN_DATA, None, Axis.ATTN_HEAD, None, None)
    meta = P(Axis.ATTN_DATA)
    kernel = kernel_binding.kernel(FAMILY)

    def body(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution):
        tuning = call_kwargs(config, q.shape[0], q.shape[1], k.shape[1])
        return kernel(
            q,
            k,
            v,
            kv_cache,
            kv_lens,
            page_indices,
            cu_q_lens,
            distribution,
            **kernel_args,
            **tuning,
        )

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, cache, meta, meta, meta, meta),
        out_specs=(qkv, cache),
        check_vma=False,
    )(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)
