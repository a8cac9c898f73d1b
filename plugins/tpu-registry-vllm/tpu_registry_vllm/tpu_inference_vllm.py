"""The vLLM-side classes of ``--attention-backend TPU_REGISTRY`` (vLLM >= 0.14 + tpu-inference).

tpu-inference's ``register_attention_backend`` asks for the class path of a subclass of its
``PallasAttentionBackend`` whose impl names the registered backend. The impl takes its
configuration from vLLM's current configuration when no platform plugin activated one.
"""

from __future__ import annotations

from tpu_inference.layers.vllm.backends.flash_attn import (
    PallasAttentionBackend,
    PallasAttentionBackendImpl,
)

from . import BACKEND_NAME
from . import tpu_inference_backend as backend


class TpuRegistryImpl(PallasAttentionBackendImpl):
    attention_backend = backend.NAME

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        backend.active_config()  # resolve now (model construction), not inside the first trace


class TpuRegistryBackend(PallasAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME  # vLLM's Attention layer looks the enum member up by this name

    @staticmethod
    def get_impl_cls() -> type[TpuRegistryImpl]:
        return TpuRegistryImpl
