"""The attention plan: what a kernel and its KV cache look like under the resolved knobs.

Framework-free arithmetic shared by the vLLM adapters, the CLI and the benchmarks. Two KV
cache layouts exist upstream:

- ``vllm_pallas`` (vLLM <= 0.13 torch_xla backend, RPA v2): ``(pages, page_size, 2 * kv_heads,
  head_dim_padded)``, K and V interleaved on the head axis.
- ``tpu_inference`` (RPA v3): ``(pages, page_size, align(2 * kv_heads, packing) // packing,
  packing, align(head_dim, 128))``, narrow dtypes packed along a sub-axis; for head dim 64 the
  hd64 kernel's ``(pages, page_size, align(kv_heads, packing) // packing, packing, 128)``, K and
  V side by side in the 128 lanes; for MLA the MLA kernel's ``(pages, align(page_size,
  kv_packing) // kv_packing, kv_packing, align(kv_lora_rank + qk_rope_head_dim, 128))``, one
  latent per token, packed by ``MLA_KV_PACKING_SIZE`` tokens whatever the dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .kernels import families_for, padded_head_dim
from .resolution import ResolvedConfig
from .units import DTYPE_BITS, align, cdiv, packing
from .workload import Workload

LAYOUTS = ("vllm_pallas", "tpu_inference")


def kv_cache_shape(
    layout: str,
    num_pages: int,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    kv_dtype: str,
    *,
    head_align: int = 128,
    mla_kv_packing: int | None = None,
) -> tuple[int, ...]:
    """One layout's cache shape. ``mla_kv_packing`` marks an MLA cache (``head_dim`` is then
    the latent plus rope width and ``num_kv_heads`` is ignored): only tpu-inference has one."""
    if mla_kv_packing is not None:
        if layout != "tpu_inference":
            raise ValueError(f"MLA has no {layout} KV cache (only tpu_inference runs MLA)")
        rows = align(page_size, mla_kv_packing) // mla_kv_packing
        return (num_pages, rows, mla_kv_packing, align(head_dim, 128))
    if layout == "vllm_pallas":
        return (num_pages, page_size, 2 * num_kv_heads, padded_head_dim(head_dim, head_align))
    if layout == "tpu_inference":
        pack = packing(kv_dtype)
        if head_dim == 64:  # the hd64 kernel: K and V side by side in the 128 lanes, no padding
            return (num_pages, page_size, align(num_kv_heads, pack) // pack, pack, 128)
        return (
            num_pages,
            page_size,
            align(2 * num_kv_heads, pack) // pack,
            pack,
            padded_head_dim(head_dim),
        )
    raise ValueError(f"unknown KV cache layout {layout!r} (known: {', '.join(LAYOUTS)})")


def kv_bytes_per_token(
    layout: str,
    num_kv_heads: int,
    head_dim: int,
    kv_dtype: str,
    *,
    head_align: int = 128,
    num_layers: int = 1,
    mla_kv_packing: int | None = None,
    page_size: int = 1,
) -> int:
    """HBM bytes one token's K and V take in the cache, per device, over ``num_layers``: a
    page's bytes over its tokens (an MLA page rounded up to its packing holds empty rows)."""
    shape = kv_cache_shape(
        layout,
        1,
        page_size,
        num_kv_heads,
        head_dim,
        kv_dtype,
        head_align=head_align,
        mla_kv_packing=mla_kv_packing,
    )
    return math.prod(shape) * DTYPE_BITS[kv_dtype] // 8 * num_layers // page_size


def tokens_in_budget(budget_bytes: int, page_size: int, bytes_per_token: int) -> int:
    """Tokens that fit in ``budget_bytes`` of KV cache, counted in whole pages."""
    page_bytes = page_size * bytes_per_token
    return (budget_bytes // page_bytes) * page_size if page_bytes else 0


@dataclass(frozen=True)
class AttentionPlan:
    """The attention plan of one resolved configuration."""

    config: ResolvedConfig

    @property
    def workload(self) -> Workload:
        return self.config.workload

    @property
    def page_size(self) -> int:
        return self.config.value("page_size")

    @property
    def head_dim_padded(self) -> int:
        return self.config.value("head_dim_padded")

    @property
    def pages_per_seq(self) -> int:
        return cdiv(self.workload.max_model_len, self.page_size)

    @property
    def families(self) -> tuple[str, ...]:
        """The kernel families that run this workload's attention on this generation."""
        return families_for(self.config.spec, self.workload)

    @property
    def mla_kv_packing(self) -> int | None:
        """Tokens per packed row of an MLA cache (None: not an MLA workload)."""
        facts = self.config.spec.kernels.mla_v2
        if not self.workload.is_mla:
            return None
        if facts is None:
            raise ValueError(f"{self.config.spec.id} has no MLA kernel, so no MLA KV cache")
        return facts.kv_packing

    @property
    def layouts(self) -> tuple[str, ...]:
        """The cache layouts that exist for this workload (MLA: tpu-inference's only)."""
        return ("tpu_inference",) if self.workload.is_mla else LAYOUTS

    def kv_cache_shape(self, layout: str, num_pages: int) -> tuple[int, ...]:
        w = self.workload
        return kv_cache_shape(
            layout,
            num_pages,
            self.page_size,
            w.kv_heads_per_device,
            w.head_dim,
            w.kv_dtype,
            head_align=self.config.spec.chip.lanes,
            mla_kv_packing=self.mla_kv_packing,
        )

    def kv_bytes_per_token(self, layout: str, num_layers: int = 1) -> int:
        w = self.workload
        return kv_bytes_per_token(
            layout,
            w.kv_heads_per_device,
            w.head_dim,
            w.kv_dtype,
            head_align=self.config.spec.chip.lanes,
            num_layers=num_layers,
            mla_kv_packing=self.mla_kv_packing,
            page_size=self.page_size,
        )

    def tokens_in_budget(self, layout: str, budget_bytes: int, num_layers: int = 1) -> int:
        return tokens_in_budget(
            budget_bytes, self.page_size, self.kv_bytes_per_token(layout, num_layers)
        )

    def kernel_kwargs(self, family: str) -> dict[str, Any]:
        if family not in self.families:
            raise ValueError(
                f"no {family} kernel of {self.config.spec.id} runs this workload (these do: "
                f"{', '.join(self.families) or 'none'})"
            )
        return self.config.kernel_kwargs(family)

    def to_dict(self) -> dict[str, Any]:
        return {
            "page_size": self.page_size,
            "head_dim_padded": self.head_dim_padded,
            "pages_per_seq": self.pages_per_seq,
            "kv_bytes_per_token_per_layer": {
                layout: self.kv_bytes_per_token(layout) for layout in self.layouts
            },
            "kernel_kwargs": {
                f: {
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in self.kernel_kwargs(f).items()
                }
                for f in self.families
            },
        }


def plan(config: ResolvedConfig) -> AttentionPlan:
    return AttentionPlan(config)
