"""Evidence from torch_xla's TPU helpers (``torch_xla._internal.tpu``).

Those helpers read the GCE metadata server unless ``TPU_SKIP_MDS_QUERY`` is set, so this
detector only calls them when it is; and, like the JAX detector, only when torch_xla is
already imported or probing is allowed.
"""

from __future__ import annotations

import sys

from tpu_registry.types import DetectContext, Evidence


def tpu_registry_detect(context: DetectContext) -> list[Evidence] | None:
    if "torch_xla" not in sys.modules and not context.allow_runtime_init:
        return None
    if context.env.get("TPU_SKIP_MDS_QUERY", "").strip().lower() in ("", "0", "false"):
        return None  # would query the metadata server: not ours to trigger
    from torch_xla._internal import tpu

    out = [Evidence("torch_xla_version", str(tpu.version()), "torch_xla._internal.tpu.version()")]
    accel = getattr(tpu, "get_tpu_type", None)
    if accel is not None:
        out.append(
            Evidence("accelerator_type", str(accel()), "torch_xla._internal.tpu.get_tpu_type()")
        )
    return out
