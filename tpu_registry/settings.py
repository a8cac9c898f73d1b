"""Every environment variable the registry reads: its name, what it does, and whether it
changes what ``resolve()`` returns (those make up the resolve cache key).

Plugins declare their own variables with the ``tpu_registry_settings`` hook; the plugin
manager adds them here. README's settings table is generated from this registry
(``scripts/gen_docs.py``) and a test holds the two equal.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping

from .frozen import Frozen


class Setting(Frozen):
    """One environment variable."""

    __slots__ = ("name", "doc", "default", "affects_resolve", "owner")
    name: str
    doc: str
    default: str
    affects_resolve: bool  # a change must invalidate cached resolve() results
    owner: str  # the distribution or plugin that reads it

    def __init__(
        self,
        name: str,
        doc: str,
        default: str = "",
        affects_resolve: bool = False,
        owner: str = "tpu-registry",
    ) -> None:
        self._fill(name, doc, default, affects_resolve, owner)


BUILTIN: tuple[Setting, ...] = (
    Setting(
        "TPU_REGISTRY_GENERATION",
        "Say which generation this is (id, alias or identifier); wins over detection.",
        affects_resolve=True,
    ),
    Setting(
        "TPU_REGISTRY_PATH",
        "Extra folders of generation files, separated by the path separator.",
        affects_resolve=True,
    ),
    Setting(
        "TPU_REGISTRY_TABLES_PATH",
        "Extra folders of tuning tables, separated by the path separator.",
        affects_resolve=True,
    ),
    Setting(
        "TPU_REGISTRY_OVERRIDES",
        "An overrides file (TOML) applied by the overrides policy; `--overrides` wins.",
        affects_resolve=True,
    ),
    Setting(
        "TPU_REGISTRY_POLICIES",
        "Comma-separated tuning policies to run besides the baseline (default: all).",
        affects_resolve=True,
    ),
    Setting(
        "TPU_REGISTRY_DISABLE_PLUGINS",
        "Comma-separated plugin names not to load (built-in or third-party).",
        affects_resolve=True,
    ),
    Setting(
        "TPU_REGISTRY_PLUGINS_AUTOLOAD",
        "`0` loads no third-party plugins from entry points.",
        default="1",
        affects_resolve=True,
    ),
    Setting(
        "TPU_REGISTRY_SYSFS_ROOT",
        "Root of the tree the sysfs detector reads (tests point it at a fake tree).",
        default="/",
        affects_resolve=True,
    ),
    Setting(
        "TPU_REGISTRY_DETECT_TIMEOUT",
        "Seconds a detector may take before it is skipped.",
        default="2",
        affects_resolve=True,
    ),
    Setting(
        "TPU_REGISTRY_CACHE_DIR",
        "Folder of the validated snapshots of data files (and the cached list of installed "
        "plugins); `off` disables them.",
        default="~/.cache/tpu-registry",
    ),
    Setting(
        "TPU_REGISTRY_TRACE_PLUGINS",
        "`1` logs every hook call (plugin, hook, time, result) to stderr.",
    ),
    Setting("TPU_REGISTRY_DEBUG", "`1` makes the CLI show the traceback of an internal error."),
    # Read by the built-in detectors: evidence, not configuration, but it changes the answer.
    Setting(
        "TPU_VERSION",
        "Evidence: a bare TPU version number (5 means v5e or v5p).",
        affects_resolve=True,
    ),
    Setting(
        "TPU_ACCELERATOR_TYPE",
        "Evidence: the Cloud accelerator type of the slice (`v5p-8`).",
        affects_resolve=True,
    ),
    Setting("TPU_TOPOLOGY", "Evidence: the slice topology (`2x2x1`).", affects_resolve=True),
    Setting(
        "TPU_CHIPS_PER_HOST_BOUNDS", "Evidence: chips on this host (`2,2,1`).", affects_resolve=True
    ),
    Setting(
        "CHIPS_PER_HOST_BOUNDS",
        "Evidence: as TPU_CHIPS_PER_HOST_BOUNDS, older spelling.",
        affects_resolve=True,
    ),
    Setting(
        "TPU_HOST_BOUNDS",
        "Evidence: the grid of hosts (VMs) in the slice (`2,2,1`); checked against the slice.",
        affects_resolve=True,
    ),
    Setting("HOST_BOUNDS", "Evidence: as TPU_HOST_BOUNDS, older spelling.", affects_resolve=True),
    Setting(
        "TPU_SKIP_MDS_QUERY",
        "Set: the torch_xla detector may call torch_xla's TPU helpers (they read no metadata "
        "server then).",
        affects_resolve=True,
    ),
)

_lock = threading.Lock()
_registry: dict[str, Setting] = {s.name: s for s in BUILTIN}
# The names resolve() keys on, kept sorted as settings are declared (read on every call), and
# the same names as os.environ stores them (bytes on POSIX), for ``environ_key``.
_key_names: tuple[str, ...] = tuple(sorted(s.name for s in BUILTIN if s.affects_resolve))
_FAST = os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict)
_key_raw: tuple = tuple(map(os.fsencode, _key_names)) if _FAST else ()


def register(settings: Iterable[Setting]) -> None:
    """Add settings a plugin declares. A name already declared by someone else is an error."""
    global _key_names, _key_raw
    with _lock:
        for s in settings:
            if not isinstance(s, Setting):
                raise TypeError(f"expected a tpu_registry.Setting, got {type(s).__name__}")
            old = _registry.get(s.name)
            if old is not None and old != s:
                raise ValueError(f"setting {s.name} is declared twice ({old.owner} and {s.owner})")
            _registry[s.name] = s
        _key_names = tuple(sorted(n for n, s in _registry.items() if s.affects_resolve))
        _key_raw = tuple(map(os.fsencode, _key_names)) if _FAST else ()


def all_settings() -> list[Setting]:
    with _lock:
        return sorted(
            _registry.values(), key=lambda s: (s.owner != "tpu-registry", s.owner, s.name)
        )


def resolve_key(env: Mapping[str, str]) -> tuple:
    """The values of every variable that changes ``resolve()``: part of its cache key."""
    return tuple((k, env.get(k)) for k in _key_names)


def environ_key() -> tuple:
    """``resolve_key(os.environ)`` in a form that is cheap to build and compare: the names and
    the raw values. ``os.environ.get`` encodes every key and decodes every value (about 0.7 µs
    each); on POSIX the mapping's own dict of bytes holds exactly what it would return, so one
    ``dict.get`` per name gives the same key ~20x faster (the warm ``resolve()`` path)."""
    if _FAST:
        return (_key_names, tuple(map(os.environ._data.get, _key_raw)))  # type: ignore[attr-defined]
    return (_key_names, resolve_key(os.environ))


def markdown_table(settings: Iterable[Setting] | None = None) -> str:
    """README's settings table."""
    rows = [
        "| variable | read by | default | changes `resolve()` | what it does |",
        "|---|---|---|---|---|",
    ]
    for s in settings if settings is not None else all_settings():
        default = f"`{s.default}`" if s.default else ""
        rows.append(
            f"| `{s.name}` | {s.owner} | {default} | {'yes' if s.affects_resolve else ''} | "
            f"{s.doc} |"
        )
    return "\n".join(rows)
