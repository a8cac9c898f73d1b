"""vLLM platform plugin: tpu-inference's TPU platform with the registry's page size.

``activate()`` is the ``vllm.platform_plugins`` entry point. It returns the platform class
path on a TPU host (the same test as vLLM's built-in TPU plugin: ``import libtpu``, or the
Pathways proxy) or when ``TPU_REGISTRY_VLLM=force``, and None when ``TPU_REGISTRY_VLLM=off``,
off TPU, or without tpu-inference (the legacy torch_xla stack keeps vLLM's own platform).
This module imports nothing heavy: vLLM imports it in every process to call ``activate()``.
"""

from __future__ import annotations

import importlib.util

from . import log, mode

PLATFORM = "tpu_registry_vllm.tpu_platform.TpuRegistryPlatform"


def activate() -> str | None:
    try:
        m = mode()
    except ValueError as e:
        log.warning("%s; the tpu_registry platform plugin stays off", e)
        return None
    if m == "off" or importlib.util.find_spec("tpu_inference") is None:
        return None
    if m == "auto":
        from vllm.platforms import tpu_platform_plugin

        if tpu_platform_plugin() is None:
            return None
    return PLATFORM
