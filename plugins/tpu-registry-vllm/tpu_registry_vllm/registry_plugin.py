"""The vLLM plugin's side of the tpu-registry plugin contract: the variables it reads.

Registered in the ``tpu_registry`` entry-point group, so ``tpu-registry plugins`` lists it and
the settings registry documents its variables. It imports no vLLM code.
"""

from __future__ import annotations

import tpu_registry
from tpu_registry import Setting

from . import ENV_MODE

# What the plugin exported, so a forked child (which inherits the variables) can tell its
# parent's export from a value the user set.
ENV_EXPORTED = "TPU_REGISTRY_VLLM_EXPORTED"


@tpu_registry.hookimpl
def tpu_registry_settings() -> list[Setting]:
    return [
        Setting(
            ENV_MODE,
            "`auto` (only on TPU), `force` or `off`: whether the vLLM plugin registers its "
            "backend and platform.",
            default="auto",
        ),
        Setting(
            ENV_EXPORTED,
            "Internal: the RPA_V3_*_BLOCK_SIZES values the vLLM plugin exported, so a child "
            "process can tell them from the user's.",
        ),
    ]
