"""Evidence from JAX: ``device_kind`` and the local device count.

Only asks a JAX whose backend this process has already initialised: importing JAX or creating
its backend can take seconds and can lock the TPU away from the runtime that will serve.
With ``allow_runtime_init`` (``--probe``) it imports JAX and initialises it.
"""

from __future__ import annotations

import sys

from tpu_registry.types import DetectContext, Evidence


def backend_initialised() -> bool:
    """True when JAX is imported and has created a backend (no side effects)."""
    if "jax" not in sys.modules:
        return False
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(xb, "_backends", None))


def tpu_registry_detect(context: DetectContext) -> Evidence | None:
    if not (backend_initialised() or context.allow_runtime_init):
        return None
    import jax

    devices = [d for d in jax.local_devices() if d.platform == "tpu"]
    if not devices:
        return None
    return Evidence(
        "device_kind",
        devices[0].device_kind,
        "jax.local_devices()",
        count=len(devices),
        count_unit="devices",
    )
