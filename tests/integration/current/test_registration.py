"""Issue 5, test 1: vLLM's own plugin loading makes ``--attention-backend TPU_REGISTRY`` select
the registry backend; ``FLASH_ATTN`` stays upstream's; off TPU, or with TPU_REGISTRY_VLLM=off,
nothing is registered.

Each scenario runs in a fresh interpreter, so nothing imports the plugin by hand first: the
only way in is the installed distribution's entry points. The scenarios start together.

How "not a TPU" is made real: vLLM's built-in TPU platform plugin decides with ``import libtpu``.
The child blocks that import (``sys.modules["libtpu"] = None`` makes it raise ImportError, as on
a machine without libtpu), so vLLM itself resolves ``UnspecifiedPlatform`` and our
``tpu_registry_vllm.activate_platform()`` applies the very same test.
"""

from __future__ import annotations

import pytest
from conftest import Background

ENGINE = """
import json, os, sys
assert "tpu_registry_vllm" not in sys.modules
from vllm.v1.attention.backends.registry import AttentionBackendEnum
import tpu_inference.layers.vllm.backends.flash_attn  # upstream's FLASH_ATTN override, as on TPU
flash_before = AttentionBackendEnum.FLASH_ATTN.get_path()
before = "TPU_REGISTRY" in AttentionBackendEnum.__members__
from vllm.engine.arg_utils import EngineArgs
vc = EngineArgs(model=MODEL, skip_tokenizer_init=True, load_format="dummy", max_model_len=2048,
                max_num_seqs=16, attention_backend="TPU_REGISTRY").create_engine_config()
from tpu_inference.layers.common.attention_backend import (attention_backend_name,
    check_attention_backend_config, create_attention_backend)
from vllm.platforms import current_platform
name = attention_backend_name(vc)
backend = create_attention_backend(name)
check_attention_backend_config(vc)
member = AttentionBackendEnum.TPU_REGISTRY
vllm_cls = member.get_class()
import tpu_registry_vllm
again = tpu_registry_vllm.register()
assert AttentionBackendEnum.FLASH_ATTN.get_path() == flash_before
rpa_vc = EngineArgs(model=MODEL, skip_tokenizer_init=True, load_format="dummy", max_model_len=2048,
                    max_num_seqs=16).create_engine_config()
rpa = create_attention_backend(attention_backend_name(rpa_vc))
os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
try:
    check_attention_backend_config(vc)
    spawn = "accepted"
except ValueError as e:
    spawn = str(e)
print(json.dumps({
    "before": before, "name": name,
    "backend": type(backend).__module__ + "." + type(backend).__qualname__,
    "rpa_backend": type(rpa).__qualname__,
    "selected": vc.attention_config.backend.name,
    "platform": type(current_platform).__module__ + "." + type(current_platform).__qualname__,
    "member_path": member.get_path(), "vllm_cls_name": vllm_cls.get_name(),
    "enum_by_name": AttentionBackendEnum[vllm_cls.get_name()].name,
    "impl_attention_backend": vllm_cls.get_impl_cls().attention_backend,
    "impl_bases": [c.__qualname__ for c in vllm_cls.get_impl_cls().__mro__[:3]],
    "flash_before": flash_before, "flash_after": AttentionBackendEnum.FLASH_ATTN.get_path(),
    "again": again, "block_size": vc.cache_config.block_size, "spawn": spawn,
}))
"""

PLAIN = """
import json, sys
BLOCK
from vllm.plugins import load_general_plugins
from vllm.platforms import current_platform
from vllm.v1.attention.backends.registry import AttentionBackendEnum
load_general_plugins()
import tpu_registry_vllm
print(json.dumps({
    "platform": type(current_platform).__qualname__, "is_tpu": current_platform.is_tpu(),
    "activate": tpu_registry_vllm.activate_platform(), "register": tpu_registry_vllm.register(),
    "members": "TPU_REGISTRY" in AttentionBackendEnum.__members__,
    "flash": AttentionBackendEnum.FLASH_ATTN.get_path(),
}))
"""
NO_LIBTPU = 'sys.modules["libtpu"] = None  # `import libtpu` now fails, as on a host without TPUs'


@pytest.fixture(scope="module")
def runs(tiny_model):
    bg = Background()
    bg.start("engine", f"MODEL = {str(tiny_model)!r}\n" + ENGINE, {"TPU_REGISTRY_VLLM": None})
    bg.start("off", PLAIN.replace("BLOCK", ""), {"TPU_REGISTRY_VLLM": "off"})
    bg.start("not_tpu", PLAIN.replace("BLOCK", NO_LIBTPU), {"TPU_REGISTRY_VLLM": None})
    bg.start("force", PLAIN.replace("BLOCK", NO_LIBTPU), {"TPU_REGISTRY_VLLM": "force"})
    return bg


def test_plugin_loading_selects_the_registry_backend(runs):
    r = runs.result("engine")
    assert r["before"] is False  # nothing registered before vLLM loaded its plugins
    assert r["selected"] == "TPU_REGISTRY"
    assert r["name"] == "tpu_registry"
    assert r["backend"] == "tpu_registry_vllm.tpu_inference_backend.RegistryAttentionBackend"
    assert r["rpa_backend"] == "RPAAttentionBackend"  # without the flag tpu-inference's own
    assert r["platform"] == "tpu_registry_vllm.tpu_inference_platform.TpuRegistryPlatform"
    assert r["member_path"] == "tpu_registry_vllm.tpu_inference_vllm.TpuRegistryBackend"
    assert r["vllm_cls_name"] == "TPU_REGISTRY" and r["enum_by_name"] == "TPU_REGISTRY"
    assert r["impl_attention_backend"] == "tpu_registry"
    assert r["impl_bases"][1] == "PallasAttentionBackendImpl"
    assert r["again"] == "current"  # registering again is harmless


def test_flash_attn_stays_upstreams(runs):
    r = runs.result("engine")
    assert (
        r["flash_before"]
        == r["flash_after"]
        == "tpu_inference.layers.vllm.backends.flash_attn.PallasAttentionBackend"
    )


def test_one_log_line_per_process(runs):
    r = runs.result("engine")
    # vLLM's log handler prints to stdout. Two engine configurations with the same workload
    # resolve the same: one line.
    lines = [x for x in r["_stdout"].splitlines() if "tpu-registry: " in x]
    assert len(lines) == 1, lines
    line = lines[0][lines[0].index("tpu-registry: ") :]
    print("\nlog line:", lines[0])
    assert line.startswith(
        "tpu-registry: v6e (detected: accelerator_type 'v6e-1' from env TPU_ACCELERATOR_TYPE)"
    )
    for part in (
        "page_size=",
        "d_block_sizes=",
        "p_block_sizes=",
        "m_block_sizes=",
        "vmem_limit_bytes=134217728 [baseline]",
        "_BLOCK_SIZES exported (tpu-inference's own attention reads them",
    ):
        assert part in line
    assert f"page_size={r['block_size']} [baseline]" in line


def test_single_host_fork_only_is_upstreams_rule(runs):
    assert "supports a single host with forked processes only" in runs.result("engine")["spawn"]


def test_off_registers_nothing(runs):
    r = runs.result("off")
    assert r["is_tpu"] is True  # a TPU platform, as far as vLLM can tell
    assert r["platform"] == "TpuPlatform"  # ours declined
    assert r["activate"] is None and r["register"] is None and r["members"] is False


def test_not_a_tpu_changes_nothing(runs):
    r = runs.result("not_tpu")
    assert r["platform"] == "UnspecifiedPlatform" and r["is_tpu"] is False
    assert r["activate"] is None and r["register"] is None and r["members"] is False
    assert "tpu_registry" not in r["flash"]


def test_force_registers_off_tpu(runs):
    r = runs.result("force")
    assert r["platform"] == "TpuRegistryPlatform"  # force takes the TPU platform without libtpu
    assert r["activate"] == "tpu_registry_vllm.tpu_inference_platform.TpuRegistryPlatform"
    assert r["register"] == "current" and r["members"] is True
