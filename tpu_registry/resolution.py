"""``resolve()``: catalog + detection + tuning -> one frozen ``ResolvedConfig``.

Cached on its arguments and on the environment variables that change the answer, so every
worker process can call it freely: a warm call is a dictionary lookup. The cache is safe
under threads (concurrent first calls compute once) and is reset in a forked child.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import settings
from .catalog import ENV_PATH, Catalog, builtin_hardware_dir, load_catalog
from .detection import detect
from .errors import CatalogError, DetectionError, Problem, warn
from .kernels import kernel_arguments
from .policies.tables import ENV_TABLES
from .records import Generation
from .tune import tune
from .types import Detection, Knob, TuneContext, Tuning, format_value
from .workload import Workload

ENV_OVERRIDES = "TPU_REGISTRY_OVERRIDES"
STAMP_EVERY_S = 1.0  # how often the data files behind a cached result are looked at again


_KEEP = object()  # for_call: keep the workload's value


@dataclass(frozen=True)
class ResolvedConfig:
    spec: Generation
    detection: Detection
    workload: Workload
    tuning: Tuning
    notes: tuple[str, ...] = field(default=())
    # The other arguments resolve() was called with, so that for_call() resolves alike.
    request: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

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

    def for_call(
        self,
        num_tokens: int,
        *,
        q_heads: int | None = None,
        kv_heads: int | None = None,
        sliding_window: int | None | object = _KEEP,
    ) -> ResolvedConfig:
        """The configuration of one kernel call: ``num_tokens`` padded tokens (a bucket vLLM
        compiles), and optionally the heads of one shard and the layer's sliding window (the
        head-dim-64 kernel's tables are keyed by it; models such as gpt-oss alternate). Upstream
        sizes blocks per call; the page size stays the engine's. Cached like every resolve()."""
        w = self.workload
        same_heads = q_heads in (None, w.q_heads_per_device) and kv_heads in (
            None,
            w.kv_heads_per_device,
        )
        same_window = sliding_window is _KEEP or sliding_window == w.sliding_window
        if num_tokens == w.tokens and same_heads and same_window:
            return self
        changes: dict[str, Any] = {"num_tokens": num_tokens, "page_size": self.value("page_size")}
        if not same_window:
            changes["sliding_window"] = sliding_window
        if num_tokens > w.max_num_batched_tokens:  # a bucket above the limit vLLM was given
            changes["max_num_batched_tokens"] = num_tokens
        if not same_heads:
            changes.update(
                num_q_heads=q_heads or w.q_heads_per_device,
                num_kv_heads=kv_heads or w.kv_heads_per_device,
                tensor_parallel=1,
            )
        call = replace(w, **changes)
        if call == w:
            return self
        return resolve(call, **self.request)

    def kernel_kwargs(self, family: str) -> dict[str, Any]:
        """Knobs of one kernel family, as keyword arguments for that kernel."""
        prefix = family + "."
        flat = {
            k[len(prefix) :]: v.value for k, v in self.tuning.knobs.items() if k.startswith(prefix)
        }
        return kernel_arguments(family, flat)

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
            + (", attention sinks" if w.attention_sinks else "")
            + (
                f", MLA latent {w.kv_lora_rank} + rope {w.qk_rope_head_dim}"
                if w.kv_lora_rank
                else ""
            )
        )
        lines.append(f"layers (most trusted first): {', '.join(self.tuning.layers) or '-'}")
        for name, k in self.tuning.knobs.items():
            lines.append(f"  {name} = {format_value(k.value)}  [{k.provenance()}]")
        lines += [f"  policy fault: {f.plugin}: {f.message}" for f in self.tuning.faults]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


_lock = threading.Lock()
_fast: dict[tuple, tuple[float, ResolvedConfig]] = {}


class _Results(dict):
    """resolve()'s results by full key. ``_fast`` indexes them by the raw arguments: whoever
    clears the results (``clear_cache()``, tools, tests) clears that index with them."""

    def clear(self) -> None:
        super().clear()
        _fast.clear()


_cache: dict[tuple, ResolvedConfig] = _Results()
_stamps: dict[tuple, tuple[float, tuple]] = {}


def _files_stamp(
    plugins, catalog_dirs: tuple[str, ...], overrides: str | None, env_key: tuple
) -> tuple:
    """Names, sizes and mtimes of every data file a resolve reads (generation files, tuning
    tables, the overrides file): part of the cache key, so an edit is seen. Looked at again
    at most once per ``STAMP_EVERY_S`` on a monotonic clock; ``clear_cache()`` forces it."""
    key = (catalog_dirs, overrides, env_key)
    now = time.monotonic()
    hit = _stamps.get(key)
    if hit is not None and now - hit[0] < STAMP_EVERY_S:
        return hit[1]
    env = os.environ
    builtin = builtin_hardware_dir()
    folders = [builtin, builtin / "tuning", *plugins.hardware_dirs(), *catalog_dirs]
    for name in (ENV_PATH, ENV_TABLES):
        folders += [p.strip() for p in env.get(name, "").split(os.pathsep) if p.strip()]
    files = [overrides or env.get(ENV_OVERRIDES, "").strip()]
    sig: list[tuple] = []
    for folder in folders:
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.endswith(".toml"):
                        st = entry.stat()
                        sig.append((entry.path, st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((str(folder), None))
    for f in files:
        if f:
            try:
                st = os.stat(f)
                sig.append((f, st.st_mtime_ns, st.st_size, st.st_mode))
            except (OSError, ValueError):  # ValueError: a NUL in the path; the policy says why
                sig.append((f, None))
    stamp = tuple(sorted(sig, key=str))
    _stamps[key] = (now, stamp)
    return stamp


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
        _fast.clear()
        _stamps.clear()
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
    # The fast path: the arguments as given and the raw values of the variables that matter,
    # trusted for STAMP_EVERY_S after the data files behind the result were last looked at.
    fast: tuple | None = (
        workload,
        simulate,
        overrides,
        allow_runtime_init,
        strict,
        catalog_dirs,
        settings.environ_key(),
    )
    try:
        seen = _fast.get(fast)
    except TypeError:  # a workload given as a dict, or unhashable arguments: the full path
        seen = fast = None
    if seen is not None and time.monotonic() - seen[0] < STAMP_EVERY_S:
        return seen[1]
    from .plugins import get_plugins

    w = _workload(workload)
    plugins = get_plugins()
    plugins.declare_settings()  # plugins declare some of the variables that make up the key
    env_key = settings.resolve_key(os.environ)
    dirs = tuple(str(d) for d in catalog_dirs)
    ov = str(overrides) if overrides else None
    stamp = _files_stamp(plugins, dirs, ov, env_key)
    key = (w, simulate, ov, allow_runtime_init, strict, dirs, env_key, stamp)
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is None:
        with _lock:
            hit = _cache.get(key)
            if hit is None:
                hit = _compute(w, simulate, overrides, allow_runtime_init, strict, catalog_dirs)
                _cache[key] = hit
    if fast is not None and fast[-1] == settings.environ_key():  # no plugin declared more
        _fast[fast] = (now, hit)
    return hit


def _compute(
    w: Workload, simulate, overrides, allow_runtime_init: bool, strict: bool, catalog_dirs
) -> ResolvedConfig:
    from .plugins import get_plugins

    env = dict(os.environ)
    catalog: Catalog = load_catalog(catalog_dirs, tolerant=True)
    try:
        detection = detect(
            catalog,
            simulate=simulate,
            allow_runtime_init=allow_runtime_init,
            strict=strict,
            env=env,
        )
    except DetectionError as e:  # an explicit id may name a file that is broken
        if catalog.broken:
            raise CatalogError(
                [p for b in catalog.broken for p in b.problems] + e.problems
            ) from None
        raise
    broken = [b for b in catalog.broken if detection.generation in (None, b.gid)]
    if broken:  # what this resolve needs is (or may be) in a broken file
        raise CatalogError([p for b in broken for p in b.problems])
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
    for b in catalog.broken:
        first = b.problems[0]
        warn(
            "catalog file %s is invalid and was left out (%s); run `tpu-registry validate`",
            b.path,
            first,
        )
        notes.append(
            f"left out of the catalog: {b.path} ({len(b.problems)} problem(s); `tpu-registry "
            "validate` lists them)"
        )
    if spec.provisional:
        notes.append(
            f"{spec.id} is provisional: its figures come from announcements and pre-release code"
        )
    notes += tuning.notes  # the baseline's, e.g. no kernel for this chip, or blocks shrunk
    request = {
        "simulate": simulate,
        "overrides": overrides,
        "allow_runtime_init": allow_runtime_init,
        "strict": strict,
        "catalog_dirs": tuple(catalog_dirs),
    }
    return ResolvedConfig(spec, detection, w, tuning, tuple(notes), request)
