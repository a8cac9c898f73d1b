"""`tpu-registry doctor`: versions from metadata, what would apply, plugin sections; imports no
framework."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from importlib import metadata

import pytest
from conftest import REPO, run_cli

import tpu_registry
from tpu_registry import DoctorContext, Workload, doctor, resolve
from tpu_registry.plugins import get_plugin_manager, get_plugins

FRAMEWORKS = ("vllm", "jax", "jaxlib", "torch", "torch_xla", "tpu_inference", "libtpu")


def _vllm_plugin():
    sys.path.insert(0, str(REPO / "plugins" / "tpu-registry-vllm"))
    try:
        import tpu_registry_vllm.registry_plugin as module
    finally:
        sys.path.pop(0)
    return module


def test_doctor_imports_no_framework():
    code = (
        "import sys, json\n"
        "from tpu_registry import cli\n"
        "cli.main(['doctor', '--json', '--simulate', 'v6e'])\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *report, loaded = out.stdout.strip().splitlines()
    assert json.loads(loaded) == []
    assert json.loads("\n".join(report))["generation"] == "v6e"


def test_doctor_reports_versions_from_metadata_and_the_knobs():
    r = run_cli(
        "doctor",
        "--json",
        "--simulate",
        "v6e",
        "--heads",
        "16",
        "--kv-heads",
        "2",
        "--head-dim",
        "128",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["packages"]["tpu-registry"] == metadata.version("tpu-registry")
    for name, version in out["packages"].items():
        try:
            assert version == metadata.version(name)
        except metadata.PackageNotFoundError:
            assert version is None
    assert out["workload"]["num_q_heads"] == 16 and out["workload"]["example"] is False
    cfg = resolve(Workload(16, 2, 128), simulate="v6e")
    assert out["knobs"]["page_size"] == {"value": cfg.value("page_size"), "provenance": "baseline"}
    assert out["knobs"]["rpa_v3.p_block_sizes"]["value"] == list(cfg.value("rpa_v3.p_block_sizes"))


def test_doctor_without_a_tpu_says_why_and_succeeds():
    r = run_cli("doctor")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "registry: not resolved: " in r.stdout and "--simulate ID" in r.stdout
    assert (
        "workload: 32 q / 8 kv heads, head dim 128, max_model_len 8192 (example: Llama-3.1-8B"
        in r.stdout
    )


def _context(packages, env=None, config=True):
    cfg = (
        resolve(Workload(32, 8, 128, max_num_batched_tokens=64), simulate="v6e") if config else None
    )
    base = dict.fromkeys(doctor.PACKAGES)
    return DoctorContext(
        {**base, **packages}, config=cfg, error="" if config else "no TPU", env=env or {}
    )


def test_vllm_plugin_section_current_stack():
    rp = _vllm_plugin()
    s = rp.tpu_registry_doctor(_context({"vllm-tpu": "0.32.0", "tpu-inference": "0.32.0"}))
    assert s["adapter"].startswith("tpu_inference_backend") and s["in_tested_range"] is True
    assert s["would_apply"][0] == "--block-size 128 (unless you give --block-size)"
    # with 64 batched tokens the baseline's mixed tuple fails bq % bq_csz: left to the kernel
    assert any(
        a.startswith("rpa_v3.m_block_sizes") and "left to the kernel" in a for a in s["would_apply"]
    )
    assert any("VMEM limit" in c for c in s["cannot_reach"])
    newer = rp.tpu_registry_doctor(_context({"vllm-tpu": "0.33.1", "tpu-inference": "0.33.1"}))
    assert newer["in_tested_range"] is False
    off = rp.tpu_registry_doctor(
        _context(
            {"vllm-tpu": "0.32.0", "tpu-inference": "0.32.0"}, env={"TPU_REGISTRY_VLLM": "off"}
        )
    )
    assert off["activates"] == "no (TPU_REGISTRY_VLLM=off)"


def test_vllm_plugin_section_legacy_and_none():
    rp = _vllm_plugin()
    s = rp.tpu_registry_doctor(_context({"vllm": "0.13.0", "torch-xla": "2.9.0"}))
    assert s["adapter"] == "torch_xla_pallas (PALLAS)" and s["in_tested_range"] is True
    cfg = resolve(Workload(32, 8, 128, max_num_batched_tokens=64), simulate="v6e")
    assert s["would_apply"] == [f"rpa_v2.{k} {v}" for k, v in cfg.kernel_kwargs("rpa_v2").items()]
    old = rp.tpu_registry_doctor(_context({"vllm": "0.10.0", "torch-xla": "2.9.0"}, config=False))
    assert old["in_tested_range"] is False and old["would_apply"] == "nothing known: no TPU"
    assert rp.tpu_registry_doctor(_context({})) == {
        "adapter": "none: neither vllm-tpu + tpu-inference nor vllm + torch-xla is installed"
    }


def test_plugin_sections_and_faults_in_the_report(capsys):
    good = types.ModuleType("good")
    good.tpu_registry_doctor = tpu_registry.hookimpl(
        lambda context: {"status": f"page {context.config.value('page_size')}"}
    )
    bad = types.ModuleType("bad")

    def boom(context):
        raise RuntimeError("cannot look")

    bad.tpu_registry_doctor = tpu_registry.hookimpl(boom)
    plugins = get_plugins()
    plugins.register(good, "good")
    plugins.register(bad, "bad")
    try:
        r = doctor.report(None, simulate="v6e")
    finally:
        get_plugin_manager().unregister(name="good")
        get_plugin_manager().unregister(name="bad")
    assert r["plugins"]["good"] == {"status": "page 256"}
    assert {"plugin": "bad", "message": "raised RuntimeError: cannot look", "stage": "doctor"} in r[
        "faults"
    ]
    text = doctor.text(r)
    assert (
        "plugin good:\n  status: page 256" in text
        and "plugin fault: bad: raised RuntimeError: cannot look" in text
    )


@pytest.mark.parametrize("flag", ["--json", None])
def test_doctor_cli_forms(flag):
    r = run_cli("doctor", "--simulate", "v5e", *([flag] if flag else []))
    assert r.returncode == 0 and r.stderr == ""
    if flag:
        assert json.loads(r.stdout)["generation"] == "v5e"
    else:
        assert "registry: v5e (simulated" in r.stdout
