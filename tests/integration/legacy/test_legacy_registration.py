"""vLLM's own plugin loading registers the legacy backend for PALLAS, and only when asked.

Each case runs in a fresh interpreter: vLLM loads general plugins once per process and
``register_backend`` is process-global.
"""

from __future__ import annotations

import json

import pytest

PROBE = r"""
import json
from importlib.metadata import entry_points
import vllm.plugins
from vllm.attention.backends.registry import AttentionBackendEnum
from vllm.platforms import current_platform

eps = sorted(ep.value for ep in entry_points(group="vllm.general_plugins"))
vllm.plugins.load_general_plugins()
# a second call (and a direct second register) must change nothing
vllm.plugins.load_general_plugins()
import sys
second = None
if "tpu_registry_vllm" in sys.modules:
    import tpu_registry_vllm
    second = tpu_registry_vllm.register()
pallas = AttentionBackendEnum.PALLAS
flash = AttentionBackendEnum.FLASH_ATTN
cls = pallas.get_class()
impl = cls.get_impl_cls()
print(json.dumps({
    "platform": type(current_platform).__name__,
    "entry_points": eps,
    "pallas_path": pallas.get_path(),
    "pallas_class": f"{cls.__module__}.{cls.__qualname__}",
    "pallas_name": cls.get_name(),
    "impl": f"{impl.__module__}.{impl.__qualname__}",
    "pallas_overridden": pallas.is_overridden(),
    "flash_path": flash.get_path(),
    "flash_overridden": flash.is_overridden(),
    "second_register": second,
    "legacy_imported": "tpu_registry_vllm.torch_xla_pallas" in sys.modules,
}))
"""

UPSTREAM_PALLAS = "vllm.v1.attention.backends.pallas.PallasAttentionBackend"
UPSTREAM_FLASH = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
OURS = "tpu_registry_vllm.torch_xla_pallas.RegistryPallasBackend"


def probe(run_python, mode: str | None) -> dict:
    r = run_python(PROBE, {"TPU_REGISTRY_VLLM": mode})
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_entry_point_is_installed(run_python):
    out = probe(run_python, "off")
    assert "tpu_registry_vllm:register" in out["entry_points"]
    assert out["platform"] == "UnspecifiedPlatform"


def test_force_makes_pallas_ours_and_leaves_flash_attn(run_python):
    out = probe(run_python, "force")
    assert out["pallas_path"] == OURS
    assert out["pallas_class"] == OURS
    assert out["pallas_name"] == "PALLAS"  # an enum member name, as the Attention layer needs
    assert out["impl"] == "tpu_registry_vllm.torch_xla_pallas.RegistryPallasBackendImpl"
    assert out["pallas_overridden"] is True
    assert out["second_register"] == "legacy"  # idempotent: same answer, nothing else changed
    assert out["flash_path"] == UPSTREAM_FLASH and out["flash_overridden"] is False


@pytest.mark.parametrize("mode", [None, "auto", "off"])
def test_not_tpu_or_off_changes_nothing(run_python, mode):
    out = probe(run_python, mode)
    assert out["pallas_path"] == UPSTREAM_PALLAS and out["pallas_overridden"] is False
    assert out["pallas_class"] == UPSTREAM_PALLAS
    assert out["flash_path"] == UPSTREAM_FLASH and out["flash_overridden"] is False
    assert out["second_register"] is None
    assert out["legacy_imported"] is False


def test_register_legacy_leaves_a_foreign_override(run_python):
    code = r"""
import json
from vllm.attention.backends.registry import AttentionBackendEnum, register_backend
from tpu_registry_vllm.torch_xla_pallas import register as register_legacy
register_backend(AttentionBackendEnum.PALLAS, class_path="some.other.Backend")
first = register_legacy()
path = AttentionBackendEnum.PALLAS.get_path()
AttentionBackendEnum.PALLAS.clear_override()
print(json.dumps([first, path, register_legacy(), register_legacy(),
                  AttentionBackendEnum.PALLAS.get_path()]))
"""
    r = run_python(code, {})
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [
        False,
        "some.other.Backend",
        True,
        True,
        OURS,
    ]
