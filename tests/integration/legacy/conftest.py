"""Legacy integration tests: vLLM 0.13 + torch_xla 2.9 on CPU (the env built by
``integration/build_env.sh legacy``). Run them there: elsewhere they fail, never skip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

try:
    import torch_xla  # noqa: F401
    import vllm.v1.attention.backends.pallas  # noqa: F401
except ImportError as e:  # the wrong environment: say so instead of skipping everything
    raise ImportError(
        f"{e}: run these tests with `integration/run_tests.sh legacy` (vLLM 0.13 + torch_xla 2.9)"
    ) from e

# What keeps torch_xla, JAX and vLLM on the CPU and off the network.
OFFLINE = {
    "PJRT_DEVICE": "CPU",
    "JAX_PLATFORMS": "cpu",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v6e-8",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture
def offline_env(monkeypatch):
    """No TPU_* variable from the machine (as the core suite's ``clean_env``, which
    ``integration/run_tests.sh`` keeps out with ``--confcutdir``), then the offline ones."""
    for name in list(os.environ):
        if name.startswith(("TPU_", "CHIPS_PER_HOST_BOUNDS", "HOST_BOUNDS")):
            monkeypatch.delenv(name, raising=False)
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(
        "TPU_REGISTRY_SYSFS_ROOT", "/nonexistent-sysfs-root"
    )  # not this machine's PCI bus
    from tpu_registry.resolution import clear_cache

    clear_cache()
    yield
    clear_cache()


def _run_python(
    code: str, env: dict[str, str | None], timeout: int = 300
) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "VLLM_PLUGINS"))}
    full.update(OFFLINE, TPU_REGISTRY_SYSFS_ROOT="/nonexistent-sysfs-root")
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=timeout
    )


@pytest.fixture
def run_python():
    """Run code in a fresh interpreter of this env, so process-global state cannot leak."""
    return _run_python
