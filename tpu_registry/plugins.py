"""The plugin manager, and the one place hooks are called.

Built-in plugins are registered first, as ordinary modules, then ``tpu_registry`` entry points
one by one (a broken one is a fault, not fatal), then ``check_pending()`` rejects any hookimpl
whose name matches no hook. ``Plugins`` has one typed method per hook. It calls each
implementation through pluggy (a subset hook caller per plugin), so hook-call monitoring sees
every call while a fault stays with the plugin that caused it and a slow detector can be
abandoned. ``TPU_REGISTRY_TRACE_PLUGINS=1`` logs every call to stderr.

``detect()`` alone may run without the plugin manager: when the cached entry-point list shows
that no enabled plugin implements ``tpu_registry_detect`` and every built-in detector would run
inline, it calls the built-in detectors itself (``detect_evidence``), and neither pluggy nor
the policies are imported. That is why the built-in detector modules carry no ``@hookimpl``
marker (it would import pluggy): the manager takes their ``tpu_registry_*`` functions by name,
as pytest does for its own hooks. ``tests/test_detect_paths.py`` holds both paths equal.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import settings
from .entrypoints import (  # noqa: F401 - ENV_* stay importable from here
    ENV_AUTOLOAD,
    ENV_DISABLE,
    ENV_TRACE,
    ESSENTIAL,
    EntryPoint,
    _env_key,
    _off,
    _save_entry_points,
    _stat,
    disabled,
    entry_points,
    known,
    no_plugin_implements,
)
from .errors import CatalogError, RegistryError, TuningError
from .frozen import Frozen, asdict, replace
from .types import EVIDENCE_KINDS, DetectContext, DoctorContext, Evidence, Fault, Layer

TYPE_CHECKING = False  # not typing's: detect() imports this module
if TYPE_CHECKING:
    from typing import Any

    import pluggy

    from .spec import Generation
    from .types import Detection, TuneContext
    from .workload import Workload


INLINE_DETECTORS = ("tpu_registry.detectors.env", "tpu_registry.detectors.sysfs")
# The built-in runtime detectors, by the runtime they ask: each returns at once unless its
# runtime is already imported or runtime init is allowed (their first line), so then they run
# inline too. A thread costs a scheduler round trip (milliseconds on a busy host).
RUNTIME_DETECTORS = {
    "tpu_registry.detectors.jax": "jax",
    "tpu_registry.detectors.torch_xla": "torch_xla",
}
# The built-in detectors, in registration order. Their hook functions are taken by name
# (``_manager``): the ``@hookimpl`` marker would import pluggy, which detect() can do without.
DETECTORS = (*INLINE_DETECTORS, *RUNTIME_DETECTORS)
BUILTIN_PLUGINS = (
    *DETECTORS,
    "tpu_registry.policies.baseline",
    "tpu_registry.policies.tables",
    "tpu_registry.policies.overrides",
)


def runs_inline(plugin_name: str, context: DetectContext) -> bool:
    """Whether a detector runs in the caller's thread: the built-in env and sysfs detectors
    (bounded by construction), and the runtime detectors while they would return at once. A
    runtime detector that may ask its runtime, and every third-party detector, gets a thread
    and the time budget."""
    if plugin_name in INLINE_DETECTORS:
        return True
    runtime = RUNTIME_DETECTORS.get(plugin_name)
    return runtime is not None and not context.allow_runtime_init and runtime not in sys.modules


def short_name(name: str) -> str:
    """``tpu_registry.detectors.env`` -> ``env``: the name used in reports and env lists."""
    return name.rsplit(".", 1)[-1] if name in BUILTIN_PLUGINS else name


class PluginInfo(Frozen):
    """One loaded plugin, as ``tpu-registry plugins`` lists it."""

    __slots__ = ("name", "kind", "distribution", "version", "hooks")
    name: str
    kind: str  # "built-in" or "entry point"
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]

    def __init__(
        self,
        name: str,
        kind: str,
        distribution: str | None,
        version: str | None,
        hooks: tuple[str, ...],
    ) -> None:
        self._fill(name, kind, distribution, version, hooks)

    def to_dict(self) -> dict:
        return {**asdict(self), "hooks": list(self.hooks)}


class Plugins:
    """The loaded plugins of one configuration, and the hook calls."""

    def __init__(self, *, autoload: bool = True, disable: str = "", trace: bool = False) -> None:
        from . import hookspecs

        self.pm = _manager()(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.load_faults: list[Fault] = []
        self.settings_faults: list[Fault] = []
        self._dists: dict[str, tuple[str, str]] = {}  # entry-point name -> (dist, version)
        # Entry points not loaded yet: the cached list knows the hooks they implement, and
        # each is loaded when one of its hooks is first called (``_impls``).
        self._deferred: dict[str, EntryPoint] = {}
        self._cached_settings: set[str] = set()  # deferred plugins whose settings are declared
        # Deferred plugins load during hook calls, which threads make at once (resolve() from
        # many threads, detectors): loading and building callers hold this lock.
        self._lock = threading.RLock()
        self._started = False
        self._block(disable)
        for modname in BUILTIN_PLUGINS:
            if not self.pm.is_blocked(modname):
                self.pm.register(importlib.import_module(modname), modname)
        if autoload:
            self._load_entry_points()
        if trace:
            self.pm.add_hookcall_monitoring(_trace_before, _trace_after)
        self.settings_faults += self._declare_settings()
        self._started = True

    def _block(self, disable: str) -> None:
        for name in disabled(disable):
            if name in ESSENTIAL:
                msg = f"{ENV_DISABLE} names {name!r}, which is essential and cannot be disabled"
                raise RegistryError(f"{msg} (without it no page size or block size is set)")
            self.pm.set_blocked(name)
            for builtin in BUILTIN_PLUGINS:
                if short_name(builtin) == name:
                    self.pm.set_blocked(builtin)

    def _load_entry_points(self) -> None:
        """Like pluggy's loader, but one broken plugin is recorded and skipped, not fatal.
        The entry points come from the cached list (``entry_points()``). A plugin whose hooks
        the list knows, from files unchanged since, is left for when one of its hooks is
        called: ``detect`` does not import a plugin that only adds a ``doctor`` section."""
        eps = entry_points()
        now = []
        for ep in eps:
            if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                continue
            if known(ep):
                self._deferred[ep.name] = ep
            else:
                now.append(ep)
        self._load(now, eps)

    def _load(self, load: list[EntryPoint], eps: list[EntryPoint] | None = None) -> None:
        """Load and register entry points; record what each implements in the cached list
        once every hook name checks out (a misnamed hook is an error each time, not once)."""
        import pluggy

        with self._lock:
            learned = False
            for ep in load:
                self._deferred.pop(ep.name, None)
                if self.pm.has_plugin(ep.name):
                    continue  # another thread loaded it first
                try:
                    plugin = _load(ep.value)
                    self.pm.register(plugin, name=ep.name)
                except Exception as e:
                    self.load_faults.append(
                        Fault(ep.name, f"failed to load: {type(e).__name__}: {e}", stage="load")
                    )
                    continue
                if ep.dist is not None:
                    self._dists[ep.name] = (ep.dist, ep.version)
                hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
                files = _module_files(plugin)
                if ep.hooks != hooks or ep.files != files:
                    ep.hooks, ep.files, learned = hooks, files, True
                if self._started:  # loaded after start-up: declare its settings now
                    self.settings_faults += self._declare_settings(only=ep.name)
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as e:
                raise RegistryError(
                    f"{e} (hook names start with 'tpu_registry_'; see docs/hooks.md)"
                ) from e
            if learned:
                _save_entry_points(eps if eps is not None else entry_points())

    def load_all(self) -> None:
        """Load every deferred entry point (``plugins``, ``doctor`` and tools list them all)."""
        with self._lock:
            if self._deferred:
                self._load(list(self._deferred.values()))

    # ------------------------------------------------------------------------ calling hooks

    def _impls(self, hook: str, *, load: bool = True) -> list[pluggy.HookImpl]:
        """Implementations in pluggy's call order (tryfirst first), deferred plugins that
        implement ``hook`` loaded first (unless ``load`` is false)."""
        with self._lock:
            wanted = [ep for ep in self._deferred.values() if hook in (ep.hooks or ())]
            if wanted and load:
                self._load(wanted)
            return list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))

    def declare_settings(self) -> None:
        """Declare the settings of deferred plugins (``resolve()`` keys its cache on every
        variable that changes its answer, plugins' included): from the cached list when it
        holds what the plugin declared last time it loaded, else by loading the plugin."""
        with self._lock:
            self._declare_cached_settings()

    def _declare_cached_settings(self) -> None:
        load = []
        for ep in list(self._deferred.values()):
            if "tpu_registry_settings" not in (ep.hooks or ()) or ep.name in self._cached_settings:
                continue
            if ep.settings is None:
                load.append(ep)
                continue
            try:
                settings.register(settings.Setting(*row) for row in ep.settings)
                self._cached_settings.add(ep.name)
            except (TypeError, ValueError):
                load.append(ep)  # the plugin itself says what is wrong, as a fault
        if load:
            self._load(load)

    def _call(self, hook: str, impl: pluggy.HookImpl, **kwargs: Any) -> Any:
        """Call one implementation through pluggy; its result, or None."""
        # Built per call: tests and tools may register plugins after the manager was built.
        # Only building it holds the lock: a hanging detector must not block other calls.
        with self._lock:
            others = [
                p for _, p in self.pm.list_name_plugin() if p is not None and p is not impl.plugin
            ]
            caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
        results = caller(**kwargs)
        return results[0] if results else None

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin after start-up (tools, tests), its settings declared too."""
        with self._lock:
            self.pm.register(plugin, name=name)
            self.settings_faults += self._declare_settings(only=name)

    def _declare_settings(self, only: str | None = None) -> list[Fault]:
        faults = []
        eps: dict[str, EntryPoint] | None = None
        learned = False
        for impl in self._impls("tpu_registry_settings", load=False):
            if only is not None and impl.plugin_name != only:
                continue
            name = short_name(impl.plugin_name)
            try:
                declared = self._call("tpu_registry_settings", impl) or []
                if impl.plugin_name not in BUILTIN_PLUGINS:  # owned by the plugin that declares it
                    declared = [
                        replace(s, owner=name) if s.owner == "tpu-registry" else s for s in declared
                    ]
                settings.register(declared)
            except Exception as e:  # noqa: BLE001 - a plugin fault must not escape
                faults.append(
                    Fault(name, f"declared bad settings: {type(e).__name__}: {e}", stage="load")
                )
                continue
            if impl.plugin_name in BUILTIN_PLUGINS:
                continue
            if eps is None:
                eps = {ep.name: ep for ep in entry_points()}
            ep = eps.get(impl.plugin_name)
            if ep is not None:  # remembered, so resolve() need not import it next time
                rows = [[s.name, s.doc, s.default, s.affects_resolve, s.owner] for s in declared]
                if ep.settings != rows:
                    ep.settings, learned = rows, True
        if learned:
            _save_entry_points(entry_points())
        return faults

    def hardware_dirs(self) -> list[Path]:
        out: list[Path] = []
        for impl in self._impls("tpu_registry_hardware_dirs"):
            out += [Path(p) for p in (self._call("tpu_registry_hardware_dirs", impl) or [])]
        return out

    def detect(self, context: DetectContext) -> tuple[list[Evidence], list[Fault]]:
        """Every detector; those in threads still running after ``context.timeout_s`` are
        abandoned. Exceptions and wrong return types become faults naming the plugin; they
        never propagate."""
        impls = self._impls("tpu_registry_detect")
        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        inline = [i for i in impls if runs_inline(i.plugin_name, context)]

        def run(impl: pluggy.HookImpl) -> None:
            try:
                results[impl.plugin_name] = self._call("tpu_registry_detect", impl, context=context)
            except BaseException as e:  # noqa: BLE001 - a plugin fault must not escape
                errors[impl.plugin_name] = e

        threads = []
        for impl in impls:
            if impl in inline:
                continue
            t = threading.Thread(
                target=run,
                args=(impl,),
                name=f"tpu-registry-detect-{impl.plugin_name}",
                daemon=True,
            )
            t.start()
            threads.append((impl.plugin_name, t))
        deadline = time.monotonic() + context.timeout_s
        for impl in inline:
            run(impl)
        threads = [(i.plugin_name, None) for i in inline] + threads
        evidence: list[Evidence] = []
        faults = list(self.load_faults) + list(self.settings_faults)
        order = {i.plugin_name: n for n, i in enumerate(impls)}
        threads.sort(key=lambda nt: order[nt[0]])  # results in hook order, as before
        for name, t in threads:
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))
            short = short_name(name)
            if t is not None and t.is_alive():
                msg = (
                    f"gave no answer within {context.timeout_s:g} s; skipped "
                    "(TPU_REGISTRY_DETECT_TIMEOUT sets the budget)"
                )
                faults.append(Fault(short, msg, stage="detect"))
                continue
            _take(short, results.get(name), errors.get(name), evidence, faults)
        return evidence, faults

    def policy_names(self) -> list[str]:
        return [short_name(i.plugin_name) for i in self._impls("tpu_registry_tune")]

    def tune(
        self,
        spec: Generation,
        workload: Workload,
        detection: Detection,
        context: TuneContext,
        *,
        only: set[str] | None = None,
    ) -> tuple[list[tuple[str, Layer]], list[Fault]]:
        """Every policy in call order (or those in ``only``): (plugin, layer) pairs and faults.

        A ``TuningError`` (the user's data is wrong) and a built-in policy's ``CatalogError`` (a
        broken tuning table) propagate; any other exception is the policy's fault."""
        layers: list[tuple[str, Layer]] = []
        faults: list[Fault] = []
        for impl in self._impls("tpu_registry_tune"):
            name = short_name(impl.plugin_name)
            if only is not None and name not in only:
                continue
            try:
                out = self._call(
                    "tpu_registry_tune",
                    impl,
                    spec=spec,
                    workload=workload,
                    detection=detection,
                    context=context,
                )
            except TuningError:
                raise  # the user's own data (an overrides file, a workload) is wrong
            except Exception as e:  # noqa: BLE001
                if isinstance(e, CatalogError) and impl.plugin_name in BUILTIN_PLUGINS:
                    raise  # a broken tuning table read by the built-in tables policy
                faults.append(Fault(name, f"raised {type(e).__name__}: {e}", stage="tune"))
                continue
            if out is None:
                continue
            if not isinstance(out, Layer):
                faults.append(
                    Fault(name, f"returned {type(out).__name__}, not a Layer or None", stage="tune")
                )
                continue
            if not isinstance(out.knobs, Mapping):
                kind = type(out.knobs).__name__
                msg = (
                    f"returned a Layer whose knobs are a {kind}, not a mapping of knob names to "
                    "values"
                )
                faults.append(Fault(name, msg, stage="tune"))
                continue
            layers.append((name, out))
        return layers, faults

    def doctor(self, context: DoctorContext) -> tuple[dict[str, Any], list[Fault]]:
        """Every plugin's section of ``tpu-registry doctor``, by plugin name, and faults."""
        sections: dict[str, Any] = {}
        faults: list[Fault] = []
        for impl in self._impls("tpu_registry_doctor"):
            name = short_name(impl.plugin_name)
            try:
                out = self._call("tpu_registry_doctor", impl, context=context)
            except Exception as e:  # noqa: BLE001 - a plugin fault must not escape
                faults.append(Fault(name, f"raised {type(e).__name__}: {e}", stage="doctor"))
                continue
            if out is None:
                continue
            if not isinstance(out, Mapping):
                msg = f"returned {type(out).__name__}, not a mapping or None"
                faults.append(Fault(name, msg, stage="doctor"))
                continue
            sections[name] = dict(out)
        return sections, faults

    # ------------------------------------------------------------------------ reports

    def describe(self) -> list[PluginInfo]:
        self.load_all()
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            builtin = name in BUILTIN_PLUGINS
            if builtin:
                dist, ver = "tpu-registry", _own_version()
            else:
                dist, ver = self._dists.get(name, (None, None))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            out.append(
                PluginInfo(
                    short_name(name), "built-in" if builtin else "entry point", dist, ver, hooks
                )
            )
        return out


def _take(
    short: str,
    out: Any,
    error: BaseException | None,
    evidence: list[Evidence],
    faults: list[Fault],
) -> None:
    """One detector's answer (or exception) into ``evidence`` and ``faults``."""
    if error is not None:
        faults.append(Fault(short, f"raised {type(error).__name__}: {error}", stage="detect"))
        return
    items = [] if out is None else [out] if isinstance(out, Evidence) else out
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, Evidence) for x in items):
        msg = f"returned {type(out).__name__}, not Evidence, a list of Evidence, or None"
        faults.append(Fault(short, msg, stage="detect"))
        return
    for x in items:
        if x.kind not in EVIDENCE_KINDS:
            msg = f"reported unknown evidence kind {x.kind!r} (known: {', '.join(EVIDENCE_KINDS)})"
            faults.append(Fault(short, msg, stage="detect"))
            continue
        evidence.append(replace(x, detector=short))


def _manager() -> type[pluggy.PluginManager]:
    """pluggy's manager, taking the built-in detectors' hook functions by name. In a built-in
    module only ``tpu_registry_*`` names are looked at: pluggy otherwise inspects every name
    the module holds (its imports included), a third of building the manager."""
    global _manager_class
    if _manager_class is None:
        import pluggy

        class Manager(pluggy.PluginManager):
            def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
                builtin = getattr(plugin, "__name__", None) in BUILTIN_PLUGINS
                if builtin and not name.startswith("tpu_registry_"):
                    return None
                opts = super().parse_hookimpl_opts(plugin, name)
                if opts is None and builtin and plugin.__name__ in DETECTORS:  # type: ignore[attr-defined]
                    return {}  # pluggy fills in the defaults: a plain hookimpl
                return opts

        _manager_class = Manager
    return _manager_class


_manager_class: type | None = None


def detect_evidence(context: DetectContext) -> tuple[list[Evidence], list[Fault]]:
    """What every detector of the process's plugins reports, and their faults.

    Without a plugin manager built yet, when no enabled entry point implements
    ``tpu_registry_detect`` (by the cached list) and every built-in detector runs inline (no
    runtime imported, no ``allow_runtime_init``), the built-in detectors are called here, in
    pluggy's order, without building the manager: the same evidence and faults, without
    importing pluggy and the policies. Anything else goes through ``Plugins.detect``."""
    plugins = current()
    if plugins is None and _builtin_detectors_only(context):
        return _detect_builtin(context)
    return get_plugins().detect(context)


def _builtin_detectors_only(context: DetectContext) -> bool:
    if _env_key()[2].strip():
        return False  # tracing shows pluggy's calls
    if not all(runs_inline(name, context) for name in DETECTORS):
        return False  # a runtime detector that may ask its runtime has a thread and a budget
    return no_plugin_implements("tpu_registry_detect")


def _detect_builtin(context: DetectContext) -> tuple[list[Evidence], list[Fault]]:
    blocked = disabled(_env_key()[1])
    evidence: list[Evidence] = []
    faults: list[Fault] = []
    for name in reversed(DETECTORS):  # pluggy calls the last registered first
        short = short_name(name)
        if name in blocked or short in blocked:
            continue
        out = error = None
        try:
            out = importlib.import_module(name).tpu_registry_detect(context=context)
        except BaseException as e:  # noqa: BLE001 - a plugin fault must not escape
            error = e
        _take(short, out, error, evidence, faults)
    return evidence, faults


# ---------------------------------------------------------------------------- tracing

_trace_local = threading.local()


def _impl_names(hook_impls: Sequence[pluggy.HookImpl]) -> str:
    return ",".join(short_name(i.plugin_name) for i in hook_impls) or "-"


def _trace_before(
    hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
) -> None:
    stack = getattr(_trace_local, "stack", None)
    if stack is None:
        stack = _trace_local.stack = []
    stack.append(time.perf_counter())


def _trace_after(
    outcome: Any, hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
) -> None:
    started = _trace_local.stack.pop()
    ms = (time.perf_counter() - started) * 1000
    exc = outcome.exception
    if exc is not None:
        result = f"raised {type(exc).__name__}: {exc}"
    else:
        value = outcome.get_result()
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        result = repr(value)
        if len(result) > 200:
            result = result[:197] + "..."
    sys.stderr.write(
        f"tpu-registry trace: {hook_name} [{_impl_names(hook_impls)}] {ms:.2f} ms -> {result}\n"
    )


# ---------------------------------------------------------------------------- the process's manager

_lock = threading.RLock()
_plugins: Plugins | None = None
_key: tuple | None = None


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have been building the manager at fork
    if _plugins is not None:
        _plugins._lock = threading.RLock()  # ... or loading a deferred plugin


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def get_plugins() -> Plugins:
    """The process-wide plugins, rebuilt when the plugin environment variables change."""
    global _plugins, _key
    key = _env_key()
    with _lock:
        if _plugins is None or _key != key:
            autoload, disable, trace = key
            _plugins = Plugins(
                autoload=not _off(autoload),
                disable=disable,
                trace=trace.strip().lower() in ("1", "true", "yes", "on"),
            )
            _key = key
        return _plugins


def get_plugin_manager() -> pluggy.PluginManager:
    """The pluggy manager of the process's plugins, every one loaded (tests register fakes on
    it)."""
    plugins = get_plugins()
    plugins.load_all()
    return plugins.pm


def reset() -> None:
    """Forget the plugins (tests, or after installing a plugin at run time)."""
    global _plugins, _key
    with _lock:
        _plugins = _key = None


def _own_version() -> str | None:
    from .version import __version__

    return __version__


# ---------------------------------------------------------------------------- entry points


def _load(value: str) -> Any:
    """What an entry point's ``module:attr.attr`` value names (as ``EntryPoint.load``)."""
    module, _, attrs = value.split("[", 1)[0].partition(":")  # extras ("[x]") load nothing
    obj = importlib.import_module(module.strip())
    for attr in filter(None, attrs.strip().split(".")):
        obj = getattr(obj, attr)
    return obj


def _module_files(plugin: Any) -> list:
    """The file of the module a plugin is (or is defined in), and its package's __init__."""
    module = plugin if hasattr(plugin, "__file__") else sys.modules.get(plugin.__module__)
    names = [getattr(module, "__file__", None)]
    package = sys.modules.get((getattr(module, "__package__", "") or "").split(".")[0])
    names.append(getattr(package, "__file__", None))
    return [[f, *_stat(f)] for f in dict.fromkeys(n for n in names if n)]


def current() -> Plugins | None:
    """The process's plugins if they are built for the current environment, else None."""
    key = _env_key()
    with _lock:
        return _plugins if _plugins is not None and _key == key else None
