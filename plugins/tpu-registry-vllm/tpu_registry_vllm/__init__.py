"""vLLM general plugin: register the registry-driven TPU attention backend.

vLLM calls ``register()`` in every process (engine, workers), so it is idempotent and cheap.
It does nothing unless the platform is TPU or ``TPU_REGISTRY_VLLM=force``;
``TPU_REGISTRY_VLLM=off`` turns it off. Installing this package therefore never changes
attention for GPU or CPU users, and on TPU it only adds a backend the user selects:

- vLLM >= 0.14 with tpu-inference: a backend named ``TPU_REGISTRY`` (``--attention-backend
  TPU_REGISTRY``), registered through tpu-inference's ``register_attention_backend``.
- vLLM 0.11.2 - 0.13 with torch_xla: ``PALLAS`` resolves to a subclass that takes its kernel
  knobs from the registry (the seed's drop-in use case).
"""

from __future__ import annotations

import logging
import os
import threading

ENV_MODE = "TPU_REGISTRY_VLLM"
BACKEND_NAME = "TPU_REGISTRY"

log = logging.getLogger("vllm.tpu_registry_vllm")  # under vLLM's logger, so its handler prints it
_lock = threading.Lock()
_registered: str | None = None  # which adapter registered in this process


def mode() -> str:
    """``auto`` (default: only on TPU), ``force`` or ``off``."""
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if value not in ("auto", "force", "off"):
        raise ValueError(f"{ENV_MODE}={value!r}: use auto, force or off")
    return value


def on_tpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_tpu())


def adapter_kind() -> str:
    """``current`` when tpu-inference provides the attention seam, else ``legacy``."""
    import importlib.util

    return "current" if importlib.util.find_spec("tpu_inference") is not None else "legacy"


def register() -> str | None:
    """Entry point of ``vllm.general_plugins``. Returns which adapter was registered."""
    global _registered
    m = mode()
    if m == "off" or (m == "auto" and not on_tpu()):
        return None
    with _lock:
        if _registered is None:
            if adapter_kind() == "current":
                from .current import register_current

                register_current()
                _registered = "current"
            else:
                from .legacy import register_legacy

                register_legacy()
                _registered = "legacy"
        return _registered
