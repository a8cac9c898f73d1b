"""vLLM plugins of tpu-registry: an attention backend and a platform, both reading the registry.

vLLM loads two entry points in every process (engine, workers), so both are idempotent, cheap
and import nothing heavy until they act:

- ``register()`` (``vllm.general_plugins``) registers the backend for the stack installed:
  ``TPU_REGISTRY`` through tpu-inference's ``register_attention_backend``
  (``tpu_inference_backend``), or, on vLLM 0.11.2 - 0.13 with torch_xla, ``PALLAS`` resolved to
  a subclass that takes its knobs from the registry (``torch_xla_pallas``).
- ``activate_platform()`` (``vllm.platform_plugins``) returns tpu-inference's TPU platform with
  the registry's page size (``tpu_inference_platform``).

Both do nothing unless the platform is TPU or ``TPU_REGISTRY_VLLM=force``;
``TPU_REGISTRY_VLLM=off`` turns them off. Installing this package never changes attention for
GPU or CPU users. On a TPU host it does change tpu-inference's own attention, not only the
backend you select: the platform applies the registry's page size, and exports the registry's
``RPA_V3_*_BLOCK_SIZES``, which tpu-inference's default backend and JAX-native models read
(``TPU_REGISTRY_VLLM_EXPORT=off`` stops the export). The start-up line says what was applied.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading

ENV_MODE = "TPU_REGISTRY_VLLM"
BACKEND_NAME = "TPU_REGISTRY"
PLATFORM = "tpu_registry_vllm.tpu_inference_platform.TpuRegistryPlatform"

log = logging.getLogger("vllm.tpu_registry_vllm")  # under vLLM's logger, so its handler prints it
_lock = threading.Lock()
_registered: str | None = None  # which stack's backend registered in this process


def mode() -> str:
    """``auto`` (default: only on TPU), ``force`` or ``off``."""
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if value not in ("auto", "force", "off"):
        raise ValueError(f"{ENV_MODE}={value!r}: use auto, force or off")
    return value


def on_tpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_tpu())


def has_tpu_inference() -> bool:
    return importlib.util.find_spec("tpu_inference") is not None


def adapter_kind() -> str:
    """``current`` when tpu-inference is installed (vLLM >= 0.14), else ``legacy`` (torch_xla)."""
    return "current" if has_tpu_inference() else "legacy"


def register() -> str | None:
    """Entry point of ``vllm.general_plugins``. Returns which adapter was registered."""
    global _registered
    m = mode()
    if m == "off" or (m == "auto" and not on_tpu()):
        return None
    with _lock:
        if _registered is None:
            if adapter_kind() == "current":
                from . import tpu_inference_backend as adapter
            else:
                from . import torch_xla_pallas as adapter  # type: ignore[no-redef]
            adapter.register()
            _registered = adapter_kind()
        return _registered


def activate_platform() -> str | None:
    """Entry point of ``vllm.platform_plugins``: the platform class path, or None.

    On a TPU host (vLLM's own test: ``import libtpu``, or the Pathways proxy) or with
    ``TPU_REGISTRY_VLLM=force``; None when off, off TPU, or without tpu-inference (the torch_xla
    stack keeps vLLM's own platform).
    """
    try:
        m = mode()
    except ValueError as e:
        log.warning("%s; the tpu_registry platform plugin stays off", e)
        return None
    if m == "off" or not has_tpu_inference():
        return None
    if m == "auto":
        from vllm.platforms import tpu_platform_plugin

        if tpu_platform_plugin() is None:
            return None
    return PLATFORM
