"""Evidence from environment variables: explicit overrides, Cloud TPU and GKE variables."""

from __future__ import annotations

import math

from tpu_registry import units
from tpu_registry.types import DetectContext, Evidence

EXPLICIT = "TPU_REGISTRY_GENERATION"


def _product(text: str) -> int | None:
    """``2,2,1`` or ``2x4`` -> 4 / 8; None unless every part is a positive whole number in
    ASCII digits (``2,x,1`` is no shape, not 2)."""
    nums = [units.count(p) for p in text.replace("x", ",").split(",")]
    if not nums or None in nums:
        return None
    return math.prod(nums)


def tpu_registry_detect(context: DetectContext) -> list[Evidence]:
    env = context.env
    out: list[Evidence] = []
    if value := env.get(EXPLICIT, "").strip():
        out.append(Evidence("explicit", value, f"env {EXPLICIT}"))
    if value := env.get("TPU_VERSION", "").strip():
        out.append(
            Evidence(
                "generation_number",
                value,
                "env TPU_VERSION",
                note="a bare version number: 5 means v5e or v5p",
            )
        )
    if value := env.get("TPU_ACCELERATOR_TYPE", "").strip():
        suffix = value.rpartition("-")[2]
        count = units.count(suffix)
        out.append(
            Evidence(
                "accelerator_type",
                value,
                "env TPU_ACCELERATOR_TYPE",
                count=count,
                count_unit="suffix",
                scope="slice",
            )
        )
    if value := env.get("TPU_TOPOLOGY", "").strip():
        out.append(
            Evidence(
                "topology",
                value,
                "env TPU_TOPOLOGY",
                count=_product(value),
                scope="slice",
                topology=value,
            )
        )
    for name in ("TPU_CHIPS_PER_HOST_BOUNDS", "CHIPS_PER_HOST_BOUNDS"):
        if value := env.get(name, "").strip():
            out.append(
                Evidence("topology", value, f"env {name}", count=_product(value), scope="host")
            )
            break
    for name in ("TPU_HOST_BOUNDS", "HOST_BOUNDS"):  # hosts (VMs) in the slice, not chips
        if value := env.get(name, "").strip():
            count = _product(value)
            out.append(
                Evidence(
                    "topology", value, f"env {name}", count=count, count_unit="hosts", scope="slice"
                )
            )
            break
    return out
