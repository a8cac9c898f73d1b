"""The ``tpu_registry`` entry points of the installed distributions, cached.

Finding them with ``importlib.metadata`` costs tens of milliseconds (importing it and reading
every distribution's metadata), on every command. The list is kept in the snapshot folder,
keyed on ``sys.path`` and the modification times of its folders and of each contributing
distribution's ``entry_points.txt`` (installing or removing a distribution changes them), and
rebuilt when they change. Once the plugin manager has loaded a plugin, the hooks it implements
and the size and time of its module files are recorded too, so ``list`` and ``show`` know,
without importing any plugin (or pluggy), whether one contributes catalog folders.
"""

from __future__ import annotations

import os
import sys

from . import snapshot

ENV_AUTOLOAD = "TPU_REGISTRY_PLUGINS_AUTOLOAD"
ENV_DISABLE = "TPU_REGISTRY_DISABLE_PLUGINS"
ENV_TRACE = "TPU_REGISTRY_TRACE_PLUGINS"
ESSENTIAL = ("baseline", "tpu_registry.policies.baseline")  # like pytest's essential plugins
PROJECT = "tpu_registry"  # the entry-point group (hookspecs.PROJECT)


def _off(value: str) -> bool:
    return value.strip().lower() in ("0", "false", "no", "off")


def _env_key() -> tuple:
    env = os.environ
    return (env.get(ENV_AUTOLOAD, "1"), env.get(ENV_DISABLE, ""), env.get(ENV_TRACE, ""))


class EntryPoint:
    """One ``tpu_registry`` entry point, as cached: where it points, its distribution, and
    (once loaded) the hooks it implements and the files that define it."""

    __slots__ = ("name", "value", "dist", "version", "where", "hooks", "files", "settings")

    def __init__(
        self,
        name,
        value,
        dist=None,
        version=None,
        where=None,
        hooks=None,
        files=None,
        settings=None,
    ):
        self.name, self.value, self.dist, self.version = name, value, dist, version
        self.where = where  # the distribution's entry_points.txt
        self.hooks: list[str] | None = hooks  # None: never loaded, unknown
        self.files: list | None = files  # [path, size, mtime_ns] of the plugin's module files
        # The settings it declared, as [name, doc, default, affects_resolve, owner] rows:
        # resolve() keys its cache on them without importing the plugin. None: unknown.
        self.settings: list | None = settings

    def to_list(self) -> list:
        return [
            self.name,
            self.value,
            self.dist,
            self.version,
            self.where,
            self.hooks,
            self.files,
            self.settings,
        ]


def _stat(path: str | None) -> list:
    if path is None:
        return [None, None]
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [None, None]


def _path_key() -> list:
    """What changes which distributions are installed: every folder on sys.path, with its
    modification time (installing or removing a distribution changes its folder's)."""
    out = [sys.executable, sys.version]
    for entry in sys.path:
        where = os.path.abspath(entry or ".")
        out.append([where, *_stat(where)])
    return out


def _cache_name() -> str:
    """One list per interpreter and search path (the current folder resolved, so processes
    started in different folders do not overwrite each other's list)."""
    import zlib

    where = [sys.executable, *(os.path.abspath(p or ".") for p in sys.path)]
    return f"entry-points-{zlib.crc32(repr(where).encode()):08x}.json"


_eps: list[EntryPoint] | None = None
_eps_key: list | None = None


def entry_points() -> list[EntryPoint]:
    """The ``tpu_registry`` entry points of the installed distributions. Cached in the snapshot
    folder, keyed on ``sys.path`` and the modification times of its folders and of each
    contributing distribution's ``entry_points.txt``: ``importlib.metadata`` (tens of
    milliseconds to import and scan) runs only when something was installed or removed."""
    global _eps, _eps_key
    key = _path_key()
    if _eps is not None and _eps_key == key:
        return _eps
    where = snapshot.cache_file(_cache_name())
    cached = snapshot.read_blob(where) if where is not None else None
    try:
        if cached is not None and cached["key"] == key:
            eps = [EntryPoint(*row) for row in cached["eps"]]
            if all(
                _stat(ep.where) == ep_stat for ep, ep_stat in zip(eps, cached["stats"], strict=True)
            ):
                _eps, _eps_key = eps, key
                return eps
    except (KeyError, TypeError, ValueError):
        pass  # a malformed list is rebuilt below
    from importlib.metadata import entry_points as scan

    eps = []
    for ep in scan(group=PROJECT):
        dist = ep.dist
        path = getattr(dist, "_path", None)
        eps.append(
            EntryPoint(
                ep.name,
                ep.value,
                dist.metadata["Name"] if dist is not None else None,
                dist.version if dist is not None else None,
                str(path / "entry_points.txt") if path is not None else None,
            )
        )
    _eps, _eps_key = eps, key
    _save_entry_points(eps)
    return eps


def _save_entry_points(eps: list[EntryPoint]) -> None:
    where = snapshot.cache_file(_cache_name())
    if where is not None and _eps_key is not None:
        stats = [_stat(ep.where) if ep.where else [None, None] for ep in eps]
        snapshot.write_blob(
            where, {"key": _eps_key, "eps": [ep.to_list() for ep in eps], "stats": stats}
        )


def known(ep: EntryPoint) -> bool:
    """True when the cached list knows which hooks ``ep`` implements and the files that
    define it are unchanged since it was last loaded."""
    return (
        ep.hooks is not None
        and bool(ep.files)
        and all(_stat(f) == [size, mtime] for f, size, mtime in ep.files)
    )


def disabled(value: str) -> tuple[str, ...]:
    """The plugin names a ``TPU_REGISTRY_DISABLE_PLUGINS`` value lists, in its order."""
    return tuple(n for n in (part.strip() for part in value.split(",")) if n)


def no_plugin_implements(hook: str) -> bool:
    """True when, by the cached entry points, no enabled plugin implements ``hook``: what it
    asks needs no plugin loaded (``tpu_registry_hardware_dirs``: the catalog, which built-in
    plugins never extend; ``tpu_registry_detect``: detection, by the built-in detectors
    alone). False when a plugin does, or when one is not known yet."""
    autoload, disable, _ = _env_key()
    names = disabled(disable)
    if any(n in ESSENTIAL for n in names):
        return False  # the plugin manager reports that mistake
    if _off(autoload):
        return True
    return all(known(ep) and hook not in ep.hooks for ep in entry_points() if ep.name not in names)
