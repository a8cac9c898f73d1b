"""Issue 5, test 5: the ``jax`` detector against the real JAX (0.11.2, CPU backend)."""

from __future__ import annotations

from conftest import run_python

from tpu_registry.detection import detect


def test_jax_on_cpu_gives_no_tpu_evidence_and_no_fault():
    import jax

    assert jax.devices()[0].platform == "cpu"  # the backend is initialised: the detector asks it
    for probe in (False, True):
        d = detect(allow_runtime_init=probe)
        assert not [f for f in d.findings if f.evidence.detector == "jax"], d.findings
        assert not [f for f in d.faults if f.plugin == "jax"], d.faults
        # The environment's TPU_ACCELERATOR_TYPE still decides; JAX neither helps nor conflicts.
        assert d.generation == "v6e" and not d.conflicts


PROBE = """
import json, sys
IMPORT_JAX
from tpu_registry.detection import detect
before = dict(getattr(sys.modules.get("jax._src.xla_bridge"), "_backends", {}) or {})
d = detect()
xb = sys.modules.get("jax._src.xla_bridge")
print(json.dumps({"jax_imported": "jax" in sys.modules, "before": list(before),
                  "after": list(getattr(xb, "_backends", {}) or {}), "generation": d.generation,
                  "jax_faults": [f.message for f in d.faults if f.plugin == "jax"]}))
"""


def test_probing_off_never_initialises_jax():
    # JAX imported but not initialised: detect() must leave it so.
    r = run_python(PROBE.replace("IMPORT_JAX", "import jax"))
    assert r["jax_imported"] and r["before"] == [] and r["after"] == []
    assert r["generation"] == "v6e" and r["jax_faults"] == []
    # JAX not imported at all: detect() does not import it.
    r = run_python(PROBE.replace("IMPORT_JAX", ""))
    assert r["jax_imported"] is False and r["after"] == []
