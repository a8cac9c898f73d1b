"""``TpuRegistryPlatform``: tpu-inference's ``TpuPlatform`` with the registry's page size.

Only the page size changes: unless the user gave ``--block-size``, ``cache_config.block_size``
is the registry's ``page_size`` and tpu-inference's own page-size rule is skipped; every other
step of ``TpuPlatform.check_and_update_config`` runs unchanged, with that page size already in
place. It also exports the registry's ``RPA_V3_*_BLOCK_SIZES`` and logs the start-up line.
MLA models get the registry's MLA page (in place of ``PallasMLAttentionBackend.get_page_size``);
this is all of the registry that reaches them, because tpu-inference runs their attention
through ``FLASH_ATTN_MLA`` whatever backend is asked for.
"""

from __future__ import annotations

from tpu_inference.platforms.tpu_platform import TpuPlatform

from tpu_registry import RegistryError

from . import BACKEND_NAME, log
from . import tpu_inference_backend as backend


class TpuRegistryPlatform(TpuPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        cache_config, model_config = vllm_config.cache_config, vllm_config.model_config
        cfg = None
        if cache_config is not None and model_config is not None:
            try:
                cfg = backend.activate(vllm_config)
            except RegistryError as e:
                if backend.selected(vllm_config):
                    raise
                log.warning(
                    "tpu-registry: cannot resolve (%s); tpu-inference's defaults apply. "
                    "--attention-backend %s would need it.",
                    e,
                    BACKEND_NAME,
                )
        if cfg is None or cache_config.user_specified_block_size:
            super().check_and_update_config(vllm_config)
            return
        # The parent keeps a block size the user specified: present ours as such for its
        # duration, so the rest of its logic runs unchanged and sees the final page size.
        cache_config.block_size = cfg.value("page_size")
        cache_config.user_specified_block_size = True
        try:
            super().check_and_update_config(vllm_config)
        finally:
            cache_config.user_specified_block_size = False
