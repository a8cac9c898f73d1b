"""``detect()`` without the plugin manager: when only the built-in detectors would run, and all
of them inline, they are called directly (``plugins.detect_evidence``). These tests hold that
path equal to pluggy's and check when each is taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, make_sysfs

from tpu_registry import plugins
from tpu_registry.types import DetectContext

V5E, V6E, V5P = (0x1AE0, 0x0063, None), (0x1AE0, 0x006F, None), (0x1AE0, 0x0062, None)

# (environment, PCI functions in the sysfs tree): agreement, conflict, nothing, unknown ids.
CASES = {
    "nothing": ({}, []),
    "v5e host": ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, [V5E] * 8),
    "v6e by env only": (
        {"TPU_ACCELERATOR_TYPE": "v6e-8", "TPU_CHIPS_PER_HOST_BOUNDS": "2,4,1"},
        [],
    ),
    "conflict": ({"TPU_ACCELERATOR_TYPE": "v5p-8"}, [V6E] * 4),
    "explicit": ({"TPU_REGISTRY_GENERATION": "v5p", "TPU_WORKER_HOSTNAMES": "a,b"}, [V5P] * 4),
    "unknown ids": (
        {"TPU_ACCELERATOR_TYPE": "v99-8", "TPU_VERSION": "nope"},
        [(0x1AE0, 0x9999, 1)],
    ),
}


@pytest.mark.parametrize("disabled", ["", "sysfs", "env,jax"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_direct_path_reports_what_pluggy_reports(case, disabled, tmp_path, monkeypatch):
    env, devices = CASES[case]
    root = make_sysfs(tmp_path, devices)
    context = DetectContext(env, sysfs_root=root)
    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", disabled)
    direct = plugins._detect_builtin(context)
    through_pluggy = plugins.Plugins(autoload=False, disable=disabled).detect(context)
    assert direct == through_pluggy
    assert direct[0] or case == "nothing" or disabled == "env,jax" and not devices


def _run(code: str, env: dict) -> dict:
    """``code`` in a fresh interpreter, with this checkout; its last line, as JSON."""
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, sys
from tpu_registry.detection import detect
d = detect(allow_runtime_init={init})
seen = sorted({{"pluggy", "tpu_registry.policies", "dataclasses", "typing"}} & set(sys.modules))
from tpu_registry.plugins import get_plugins
get_plugins()  # the manager: detect() now goes through pluggy
again = detect(allow_runtime_init={init})
strip = lambda d: {{k: v for k, v in d.to_dict().items()}}
print(json.dumps({{"imported": seen, "same": strip(d) == strip(again), "gen": d.generation,
                  "reason": d.reason}}))
"""


def test_a_process_with_only_built_in_detectors_never_imports_pluggy(tmp_path):
    root = make_sysfs(tmp_path / "sys", [V5E] * 4)
    env = {
        "TPU_REGISTRY_CACHE_DIR": str(tmp_path / "cache"),
        "TPU_REGISTRY_PLUGINS_AUTOLOAD": "0",
        "TPU_REGISTRY_SYSFS_ROOT": str(root),
        "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    }
    _run(PROBE.format(init=False), env)  # the first process validates and snapshots the catalog
    out = _run(PROBE.format(init=False), env)
    assert out == {
        "imported": [],
        "same": True,
        "gen": "v5e",
        "reason": out["reason"],  # checked below: both detectors were heard
    }
    assert "pci" in out["reason"] or "accelerator_type" in out["reason"]


@pytest.mark.parametrize(
    "why, env, init",
    [
        ("tracing shows pluggy's hook calls", {"TPU_REGISTRY_TRACE_PLUGINS": "1"}, False),
        ("a runtime detector may start its runtime", {}, True),
        ("the essential baseline is disabled", {"TPU_REGISTRY_DISABLE_PLUGINS": "baseline"}, False),
    ],
)
def test_the_plugin_manager_is_built_when_the_direct_path_would_differ(tmp_path, why, env, init):
    base = {
        "TPU_REGISTRY_CACHE_DIR": str(tmp_path / "cache"),
        "TPU_REGISTRY_PLUGINS_AUTOLOAD": "0",
        "TPU_ACCELERATOR_TYPE": "v6e-8",
        "JAX_PLATFORMS": "cpu",
        # JAX sets it when it starts (and torch_xla's detector reads it): set from the start,
        # both calls see the same environment.
        "TPU_SKIP_MDS_QUERY": "1",
    }
    code = PROBE.format(init=init)
    if "TPU_REGISTRY_DISABLE_PLUGINS" in env:  # the manager refuses it, as before
        code = (
            "import json\nfrom tpu_registry.detection import detect\n"
            "try:\n    detect()\nexcept Exception as e:\n"
            "    print(json.dumps({'error': str(e)}))\n"
        )
        out = _run(code, {**base, **env})
        assert "essential and cannot be disabled" in out["error"], why
        return
    out = _run(code, {**base, **env})
    assert "pluggy" in out["imported"] and out["same"] and out["gen"] == "v6e", why


def test_an_installed_detector_plugin_takes_the_plugin_manager(tmp_path, monkeypatch):
    """The GCE plugin (installed in the test environment) implements tpu_registry_detect: once
    the cached entry-point list knows that, or while it does not know the plugin yet, the
    plugin manager runs every detector."""
    from tpu_registry.entrypoints import no_plugin_implements

    monkeypatch.setenv("TPU_REGISTRY_CACHE_DIR", str(tmp_path / "cache"))
    context = DetectContext({})
    assert not plugins._builtin_detectors_only(context)
    assert not no_plugin_implements("tpu_registry_detect")  # not known yet: it must be loaded
    plugins.reset()
    plugins.get_plugins().detect(context)  # loads it, and the list learns its hooks
    plugins.reset()
    assert not no_plugin_implements("tpu_registry_detect")  # known: it detects
    assert no_plugin_implements("tpu_registry_hardware_dirs")  # ... and adds no catalog folder
    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", "gce,vllm")
    assert no_plugin_implements("tpu_registry_detect")  # blocked: only the built-ins are left
