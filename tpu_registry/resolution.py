"""``resolve()``: catalog + detection + tuning -> one frozen ``ResolvedConfig``.

Cached on its arguments and on the environment variables that change the answer, so every
worker process can call it freely: a warm call is a dictionary lookup. The cache is safe
under threads (concurrent first calls compute once) and is reset in a forked child.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import settings
from .catalog import Catalog, load_catalog
from .detection import detect
from .errors import DetectionError, Problem
from .spec import Generation
from .tune import tune
from .types import Detection, Knob, TuneContext, Tuning, format_value
from .workload import Workload

ENV_OVERRIDES = "TPU_REGISTRY_OVERRIDES"


@dataclass(frozen=True)
class ResolvedConfig:
    spec: Generation
    detection: Detection
    workload: Workload
    tuning: Tuning
    notes: tuple[str, ...] = field(default=())

    @property
    def generation(self) -> str:
        return self.spec.id

    @property
    def knobs(self) -> Mapping[str, Knob]:
        return self.tuning.knobs

    def value(self, name: str, default: Any = None) -> Any:
        k = self.tuning.knobs.get(name)
        return default if k is None else k.value

    def layer(self, name: str) -> str | None:
        k = self.tuning.knobs.get(name)
        return None if k is None else k.layer

    def kernel_kwargs(self, family: str) -> dict[str, Any]:
        """Knobs of one kernel family, as keyword arguments for that kernel."""
        prefix = family + "."
        return {
            k[len(prefix) :]: v.value for k, v in self.tuning.knobs.items() if k.startswith(prefix)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.spec.id,
            "name": self.spec.name,
            "provisional": self.spec.provisional,
            "detection": self.detection.to_dict(),
            "workload": self.workload.to_dict(),
            "knobs": {k: v.to_dict() for k, v in self.tuning.knobs.items()},
            "layers": list(self.tuning.layers),
            "faults": [f.to_dict() for f in self.tuning.faults],
            "notes": list(self.notes),
        }

    def explain(self) -> str:
        d = self.detection
        lines = [
            f"generation: {self.spec.id} "
            f"({self.spec.name}){' PROVISIONAL' if self.spec.provisional else ''}",
            f"  why: {d.status}: {d.reason}",
        ]
        for f in d.findings:
            e = f.evidence
            lines.append(
                f"  evidence: [{f.status}] {e.kind}={e.value!r} from {e.source} -> "
                f"{', '.join(f.candidates) or '-'}"
            )
        lines += [f"  conflict: {c}" for c in d.conflicts]
        lines += [f"  detector fault: {x.plugin}: {x.message}" for x in d.faults]
        w = self.workload
        lines.append(
            f"workload: {w.num_q_heads} q heads, {w.num_kv_heads} kv heads, head dim "
            f"{w.head_dim}, {w.q_dtype}/{w.kv_dtype}, max_model_len {w.max_model_len}, "
            f"max_num_seqs {w.max_num_seqs}, max_num_batched_tokens {w.max_num_batched_tokens}, "
            f"tp {w.tensor_parallel}"
            + (f", sliding window {w.sliding_window}" if w.sliding_window else "")
        )
        lines.append(f"layers (most trusted first): {', '.join(self.tuning.layers) or '-'}")
        for name, k in self.tuning.knobs.items():
            lines.append(f"  {name} = {format_value(k.value)}  [{k.provenance()}]")
        lines += [f"  policy fault: {f.plugin}: {f.message}" for f in self.tuning.faults]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


_lock = threading.Lock()
_cache: dict[tuple, ResolvedConfig] = {}


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # the parent's lock may have been held by another thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def clear_cache() -> None:
    from . import catalog as _catalog
    from . import plugins as _plugins
    from .policies import overrides as _overrides
    from .policies import tables as _tables

    with _lock:
        _cache.clear()
    _catalog.clear_cache()
    _tables.clear_cache()
    _overrides.clear_cache()
    _plugins.reset()


def _workload(w: Workload | Mapping[str, Any]) -> Workload:
    return w if isinstance(w, Workload) else Workload.from_dict(w)


def resolve(
    workload: Workload | Mapping[str, Any],
    *,
    simulate: str | None = None,
    overrides: os.PathLike | str | None = None,
    allow_runtime_init: bool = False,
    strict: bool = False,
    catalog_dirs: tuple[os.PathLike | str, ...] = (),
) -> ResolvedConfig:
    """Detect the generation, tune for the workload and return the frozen result.

    Raises ``DetectionError`` when no single generation is found (say which with
    ``simulate`` or ``TPU_REGISTRY_GENERATION``), and ``TuningError`` or ``CatalogError`` for
    bad workloads, overrides or catalog files.
    """
    from .plugins import get_plugins

    w = _workload(workload)
    get_plugins()  # plugins declare the settings that make up the key
    env_key = settings.resolve_key(os.environ)
    key = (
        w,
        simulate,
        str(overrides) if overrides else None,
        allow_runtime_init,
        strict,
        tuple(str(d) for d in catalog_dirs),
        env_key,
    )
    hit = _cache.get(key)
    if hit is not None:
        return hit
    with _lock:
        hit = _cache.get(key)
        if hit is None:
            hit = _compute(w, simulate, overrides, allow_runtime_init, strict, catalog_dirs)
            _cache[key] = hit
    return hit


def _compute(
    w: Workload, simulate, overrides, allow_runtime_init: bool, strict: bool, catalog_dirs
) -> ResolvedConfig:
    from .plugins import get_plugins

    env = dict(os.environ)
    catalog: Catalog = load_catalog(catalog_dirs)
    detection = detect(
        catalog, simulate=simulate, allow_runtime_init=allow_runtime_init, strict=strict, env=env
    )
    if detection.generation is None:
        what = {
            "ambiguous": (
                f"the evidence fits several generations ({', '.join(detection.candidates)})"
            ),
            "conflict": "the evidence conflicts",
        }.get(detection.status, "no TPU was found")
        hint = "say which generation with --simulate ID or TPU_REGISTRY_GENERATION=ID"
        raise DetectionError(
            [Problem("detection", None, "", f"cannot resolve: {what}: {detection.reason}", hint)]
        )
    spec = catalog[detection.generation]
    raw = str(overrides) if overrides else env.get(ENV_OVERRIDES, "").strip()
    context = TuneContext(
        catalog, spec, w, detection, overrides_path=Path(raw) if raw else None, env=env
    )
    tuning = tune(get_plugins(), context, strict=strict)
    notes = []
    if spec.provisional:
        notes.append(
            f"{spec.id} is provisional: its figures come from announcements and pre-release code"
        )
    if not spec.kernels.families:
        notes.append(f"no paged-attention kernel supports {spec.id}")
    return ResolvedConfig(
        spec=spec, detection=detection, workload=w, tuning=tuning, notes=tuple(notes)
    )
