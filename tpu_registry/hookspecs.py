"""The hooks a tpu-registry plugin can implement.

One marker name, ``tpu_registry``, is shared by ``hookspec``, ``hookimpl`` and the entry-point
group, so a plugin package declares::

    [project.entry-points.tpu_registry]
    my_plugin = "my_package.my_module"

and decorates its functions with ``@tpu_registry.hookimpl``. Built-in plugins are ordinary
modules registered the same way. Every hook is documented with an example in
``docs/hooks.md``; a test fails if one is missing there. An implementation declares only the
arguments it uses (pluggy passes it those), so hooks gain arguments without breaking plugins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .settings import Setting
    from .spec import Generation
    from .types import DetectContext, Detection, DoctorContext, Evidence, Layer, TuneContext
    from .workload import Workload

PROJECT = "tpu_registry"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tpu_registry_settings() -> Sequence[Setting] | None:
    """Declare the environment variables this plugin reads.

    Each is a ``tpu_registry.Setting``; those with ``affects_resolve=True`` become part of the
    ``resolve()`` cache key, and all appear in ``tpu-registry plugins --json``.

    :returns: a list of settings, or None.
    """


@hookspec
def tpu_registry_hardware_dirs() -> Sequence[Path | str] | None:
    """Return folders of generation files (``*.toml``) to add to the catalog.

    They are read after the built-in folder and before ``TPU_REGISTRY_PATH``. A file in them
    that reuses a built-in id must say ``replaces = "<id>"``.

    :returns: a list of folders, or None.
    """


@hookspec
def tpu_registry_detect(context: DetectContext) -> Evidence | Sequence[Evidence] | None:
    """Report raw evidence of which TPU this host has.

    A detector reports what it saw (a device_kind string, a PCI id, an accelerator type...)
    and never decides the generation: the catalog maps evidence to candidates. It must not
    initialise a TPU runtime unless ``context.allow_runtime_init`` is true, should read the
    environment from ``context.env``, and should return quickly: detection gives up on a
    detector after ``context.timeout_s`` seconds.

    :param context: environment, sysfs root, probing permission and time budget.
    :returns: one piece of evidence, a list of them, or None when it saw nothing.
    """


@hookspec
def tpu_registry_tune(
    spec: Generation, workload: Workload, detection: Detection, context: TuneContext
) -> Layer | None:
    """Return a named, partial layer of knobs for this generation and workload, or None.

    Layers merge in call order: an implementation called earlier wins. Built-ins are
    ``overrides`` (tryfirst), ``tables`` and ``baseline`` (trylast), so a plain plugin lands
    between tables and overrides; a ``trylast=True`` one runs after baseline and only fills
    knobs nobody else set.

    :param spec: the generation being tuned for.
    :param workload: attention shape, dtypes and serving limits.
    :param detection: how the generation was found (a policy may ignore it).
    :param context: the catalog, the overrides file in force and the environment to use.
    :returns: a ``Layer(name, knobs)``; knob names are ``page_size`` or ``family.knob``.
    """


@hookspec
def tpu_registry_doctor(context: DoctorContext) -> Mapping[str, Any] | None:
    """Contribute a section to ``tpu-registry doctor``: what this plugin would do here.

    Must not import heavy frameworks (read versions from ``context.packages``): doctor is what
    a user runs, and pastes into a bug report, when something does not start. The section is
    shown under the plugin's name; plain JSON values only.

    :param context: installed package versions, the resolved configuration (or None, with
        ``context.error`` saying why) and the environment.
    :returns: a mapping for the report, or None.
    """
