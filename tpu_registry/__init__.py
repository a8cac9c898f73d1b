"""tpu-registry: declarative, pluggable facts and kernel knobs for Google TPU generations.

Public API::

    from tpu_registry import load_catalog, detect, resolve, Workload, hookimpl

The flow is catalog -> detect -> tune -> resolve -> attention plan; each step is one module.
"""

from __future__ import annotations

from .errors import CatalogError, DetectionError, RegistryError, TuningError
from .hookspecs import hookimpl

__all__ = [
    "CatalogError",
    "DetectionError",
    "Evidence",
    "Layer",
    "RegistryError",
    "ResolvedConfig",
    "TuningError",
    "Workload",
    "detect",
    "hookimpl",
    "load_catalog",
    "plan",
    "resolve",
]

from .attention import plan
from .catalog import load_catalog
from .detect import Evidence, detect
from .resolve import ResolvedConfig, resolve
from .tune import Layer, Workload
