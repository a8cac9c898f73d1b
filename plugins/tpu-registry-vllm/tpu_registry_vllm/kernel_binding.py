"""The one place an adapter calls its attention kernel.

On a TPU the seam holds the Pallas kernel. On CPU, tests bind the upstream reference
implementation instead (the Pallas kernels cannot run on CPU, not even in interpret mode) and
check both numerics and the exact keyword arguments the registry chose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_bound: dict[str, Callable[..., Any]] = {}


def _default(family: str) -> Callable[..., Any]:
    if family == "rpa_v3":
        from tpu_inference.kernels.ragged_paged_attention.v3.kernel import ragged_paged_attention

        return ragged_paged_attention
    if family == "rpa_v3_hd64":
        from tpu_inference.kernels.ragged_paged_attention.v3.kernel_hd64 import (
            ragged_paged_attention_hd64,
        )

        return ragged_paged_attention_hd64
    if family == "rpa_v2":
        import torch

        return torch.ops.xla.ragged_paged_attention
    if family == "kv_cache_update":
        # vLLM <= 0.13's KV-cache write (a Pallas kernel on TPU; a no-op on non-XLA tensors).
        from vllm.v1.attention.backends.pallas import write_to_kv_cache

        return write_to_kv_cache
    raise KeyError(f"no kernel for family {family!r}")


def kernel(family: str) -> Callable[..., Any]:
    fn = _bound.get(family)
    if fn is None:
        fn = _bound[family] = _default(family)
    return fn


@contextmanager
def bind(family: str, fn: Callable[..., Any]) -> Iterator[None]:
    """Temporarily route ``family`` calls to ``fn`` (tests, or an experimental kernel)."""
    previous = _bound.get(family)
    _bound[family] = fn
    try:
        yield
    finally:
        if previous is None:
            _bound.pop(family, None)
        else:
            _bound[family] = previous
