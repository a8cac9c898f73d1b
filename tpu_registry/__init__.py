"""tpu-registry: declarative, pluggable facts and kernel knobs for Google TPU generations.

Public API and plugin contract::

    import tpu_registry
    from tpu_registry import load_catalog, detect, resolve, Workload

    @tpu_registry.hookimpl
    def tpu_registry_detect(context: tpu_registry.DetectContext): ...

The flow is catalog -> detect -> tune -> resolve -> attention plan; each step is one module.
Names are imported on first use (PEP 562), so ``import tpu_registry`` loads nothing else.
"""

# Nothing is imported here, not even ``typing``: ``import tpu_registry`` costs one module.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers know it)

# name -> module that defines it
_EXPORTS = {
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "Problem": "errors",
    "RegistryError": "errors",
    "CatalogError": "errors",
    "DetectionError": "errors",
    "TuningError": "errors",
    "Setting": "settings",
    "Evidence": "types",
    "DetectContext": "types",
    "DoctorContext": "types",
    "Detection": "types",
    "Finding": "types",
    "Fault": "types",
    "Layer": "types",
    "Knob": "types",
    "Tuning": "types",
    "TuneContext": "types",
    "Violation": "types",
    "Workload": "workload",
    "SINK_MODEL_TYPES": "workload",
    "canonical_dtype": "units",
    "cdiv": "units",
    "rpa_v3_rejection": "kernels",
    "Generation": "records",
    "Slice": "slices",
    "SliceError": "slices",
    "slice_of": "slices",
    "Catalog": "catalog",
    "load_catalog": "catalog",
    "detect": "detection",
    "reconcile": "detection",
    "resolve": "resolution",
    "ResolvedConfig": "resolution",
    "clear_cache": "resolution",
    "plan": "attention",
    "AttentionPlan": "attention",
    "kv_cache_shape": "attention",
    "kv_bytes_per_token": "attention",
}
__all__ = [
    "AttentionPlan",
    "Catalog",
    "CatalogError",
    "DetectContext",
    "Detection",
    "DetectionError",
    "DoctorContext",
    "Evidence",
    "Fault",
    "Finding",
    "Generation",
    "Knob",
    "Layer",
    "Problem",
    "RegistryError",
    "ResolvedConfig",
    "SINK_MODEL_TYPES",
    "Setting",
    "Slice",
    "SliceError",
    "TuneContext",
    "Tuning",
    "TuningError",
    "Violation",
    "Workload",
    "canonical_dtype",
    "cdiv",
    "clear_cache",
    "detect",
    "hookimpl",
    "hookspec",
    "kv_bytes_per_token",
    "kv_cache_shape",
    "load_catalog",
    "plan",
    "reconcile",
    "resolve",
    "rpa_v3_rejection",
    "slice_of",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> "Any":  # noqa: UP037 - typing is not imported at run time
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tpu_registry' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> "list[str]":  # noqa: UP037
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and editors; never executed
    from typing import Any

    from .attention import AttentionPlan, kv_bytes_per_token, kv_cache_shape, plan
    from .catalog import Catalog, load_catalog
    from .detection import detect, reconcile
    from .errors import CatalogError, DetectionError, Problem, RegistryError, TuningError
    from .hookspecs import hookimpl, hookspec
    from .kernels import rpa_v3_rejection
    from .records import Generation
    from .resolution import ResolvedConfig, clear_cache, resolve
    from .settings import Setting
    from .slices import Slice, SliceError, slice_of
    from .types import (
        DetectContext,
        Detection,
        DoctorContext,
        Evidence,
        Fault,
        Finding,
        Knob,
        Layer,
        TuneContext,
        Tuning,
        Violation,
    )
    from .units import canonical_dtype, cdiv
    from .workload import SINK_MODEL_TYPES, Workload
