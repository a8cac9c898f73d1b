"""The ``torch_xla`` detector against the real torch_xla 2.9.

torch_xla 2.9 has both helpers the detector calls: ``torch_xla._internal.tpu.version()`` and
``get_tpu_type()`` (there is no ``torch_xla.tpu`` module). Without ``TPU_SKIP_MDS_QUERY`` both
read the GCE metadata server, so the detector must not call them then.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ONLY_TORCH_XLA = "env,sysfs,jax"  # disable the other built-in detectors: torch_xla alone decides


def test_torch_xla_evidence_gives_v6e(offline_env, monkeypatch):
    import torch_xla  # noqa: F401  (imported: the detector may use it)
    from torch_xla._internal import tpu

    from tpu_registry.detection import detect

    assert callable(tpu.version) and callable(tpu.get_tpu_type)
    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", ONLY_TORCH_XLA)
    d = detect()
    assert d.generation == "v6e", d.reason
    ev = {
        (f.evidence.kind, f.evidence.value, f.evidence.source)
        for f in d.findings
        if f.evidence.detector == "torch_xla"
    }
    assert ev == {
        ("torch_xla_version", "6", "torch_xla._internal.tpu.version()"),
        ("accelerator_type", "v6e", "torch_xla._internal.tpu.get_tpu_type()"),
    }
    assert all(f.evidence.detector == "torch_xla" for f in d.findings)
    assert not d.faults


def test_torch_xla_evidence_agrees_with_the_environment(offline_env):
    import torch_xla  # noqa: F401

    from tpu_registry.detection import detect

    d = detect()
    assert d.generation == "v6e" and d.status == "detected" and not d.conflicts
    assert {f.evidence.detector for f in d.findings} >= {"env", "torch_xla"}


def test_no_metadata_server_without_skip(offline_env, monkeypatch):
    """TPU_SKIP_MDS_QUERY unset: the detector returns nothing and calls nothing in torch_xla."""
    import requests
    import torch_xla  # noqa: F401
    from torch_xla._internal import tpu

    from tpu_registry.detection import DetectContext, detect
    from tpu_registry.detectors import torch_xla as detector

    calls = []

    def trap(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called")

        return f

    for name in ("version", "get_tpu_type", "get_tpu_env", "_get_metadata"):
        monkeypatch.setattr(tpu, name, trap(f"tpu.{name}"))
    monkeypatch.setattr(requests, "get", trap("requests.get"))
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY")
    ctx = DetectContext(
        env=dict(os.environ),
        sysfs_root=Path("/nonexistent-sysfs-root"),
        allow_runtime_init=True,
        timeout_s=2.0,
    )
    assert detector.tpu_registry_detect(ctx) is None
    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", ONLY_TORCH_XLA)
    d = detect(allow_runtime_init=True)
    assert d.generation is None and not d.findings and not d.faults
    assert calls == []


PROBE = r"""
import json, sys
from tpu_registry.detection import detect
d = detect()
print(json.dumps({
    "generation": d.generation,
    "detectors": sorted({f.evidence.detector for f in d.findings}),
    "torch_xla_imported": "torch_xla" in sys.modules,
    "jax_imported": "jax" in sys.modules,
}))
"""


@pytest.mark.parametrize("skip_mds", ["1", None])
def test_not_imported_means_not_touched(run_python, skip_mds):
    """torch_xla not imported and probing off: no torch_xla evidence, and it stays unimported."""
    r = run_python(PROBE, {"TPU_SKIP_MDS_QUERY": skip_mds})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["torch_xla_imported"] is False and out["jax_imported"] is False
    assert "torch_xla" not in out["detectors"]
    assert out["generation"] == "v6e" and out["detectors"] == ["env"]  # TPU_ACCELERATOR_TYPE alone
