"""The plugin manager: built-in plugins first, then ``tpu_registry`` entry points.

``TPU_REGISTRY_PLUGINS_AUTOLOAD=0`` skips entry points; ``TPU_REGISTRY_DISABLE_PLUGINS=a,b``
blocks plugins by name (built-in or third-party). ``check_pending()`` rejects any hookimpl
whose name matches no hook, so a misspelled hook fails loudly instead of never running.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pluggy

from . import hookspecs
from .errors import RegistryError

ENV_AUTOLOAD = "TPU_REGISTRY_PLUGINS_AUTOLOAD"
ENV_DISABLE = "TPU_REGISTRY_DISABLE_PLUGINS"

BUILTIN_PLUGINS = (
    "tpu_registry.detectors.env",
    "tpu_registry.detectors.sysfs",
    "tpu_registry.detectors.jax",
    "tpu_registry.detectors.torch_xla",
    "tpu_registry.policies.baseline",
    "tpu_registry.policies.tables",
    "tpu_registry.policies.overrides",
)

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_pm_key: tuple | None = None


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have been building the manager at fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def short_name(name: str) -> str:
    """``tpu_registry.detectors.env`` -> ``env``: the name used in reports and env lists."""
    return name.rsplit(".", 1)[-1]


def _settings() -> tuple:
    return (os.environ.get(ENV_AUTOLOAD, "1"), os.environ.get(ENV_DISABLE, ""))


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, rebuilt when the plugin environment variables change."""
    global _pm, _pm_key
    key = _settings()
    with _lock:
        if _pm is not None and _pm_key == key:
            return _pm
        _pm, _pm_key = _build(*key), key
        return _pm


def _build(autoload: str, disable: str) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in (n.strip() for n in disable.split(",")):
        if name:
            pm.set_blocked(name)
            for builtin in BUILTIN_PLUGINS:
                if short_name(builtin) == name:
                    pm.set_blocked(builtin)
    for modname in BUILTIN_PLUGINS:
        if not pm.is_blocked(modname):
            pm.register(importlib.import_module(modname), modname)
    if autoload.strip().lower() not in ("0", "false", "no", "off"):
        _load_entry_points(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise RegistryError(f"{e} (hook names start with 'tpu_registry_'; see docs/hooks.md)") from e
    return pm


# Entry points that failed to import: (name, message). Reported by detect/resolve and
# `tpu-registry plugins`; an error only under --strict. Distributions of loaded plugins.
load_faults: list[tuple[str, str]] = []
_dists: dict[str, object] = {}  # entry-point name -> Distribution; read only by `plugins`


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Like pluggy's loader, but one broken plugin is recorded and skipped, not fatal."""
    from importlib.metadata import entry_points

    load_faults.clear()
    for ep in entry_points(group=hookspecs.PROJECT):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as e:
            load_faults.append((ep.name, f"failed to load: {type(e).__name__}: {e}"))
            continue
        if ep.dist is not None:
            _dists[ep.name] = ep.dist


def reset() -> None:
    """Forget the manager (tests, or after installing a plugin at run time)."""
    global _pm, _pm_key
    with _lock:
        _pm = _pm_key = None


def hardware_dirs() -> list[Path]:
    out: list[Path] = []
    for result in get_plugin_manager().hook.tpu_registry_hardware_dirs():
        out += [Path(p) for p in (result or [])]
    return out


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str  # "built-in" or "entry point"
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "distribution": self.distribution, "version": self.version, "hooks": list(self.hooks)}


def describe_plugins() -> list[PluginInfo]:
    pm = get_plugin_manager()
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        builtin = name in BUILTIN_PLUGINS
        if builtin:
            dist, ver = "tpu-registry", _own_version()
        else:
            d = _dists.get(name)
            dist, ver = (d.metadata["Name"], d.version) if d is not None else (None, None)
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or []))
        out.append(PluginInfo(short_name(name) if builtin else name, "built-in" if builtin else "entry point", dist, ver, hooks))
    return out


def _own_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tpu-registry")
    except PackageNotFoundError:
        return None
