"""Shared fixtures: a clean environment for every test, and helpers for the CLI and sysfs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HARDWARE = REPO / "hardware"

# Variables that change detection or tuning: no test may inherit them from the machine.
_ENV_PREFIXES = ("TPU_", "CHIPS_PER_HOST_BOUNDS", "HOST_BOUNDS")


# The distributions of this repository. Any other entry point of the `tpu_registry` group (a
# user's own policy or detector installed in the same environment) is blocked in every test:
# the suite checks this project's behaviour, not that of whatever else is installed.
OURS = {"tpu-registry", "tpu-registry-gce", "tpu-registry-vllm"}


def _foreign_plugins() -> tuple[str, ...]:
    from importlib.metadata import entry_points

    return tuple(
        sorted(
            {
                ep.name
                for ep in entry_points(group="tpu_registry")
                if ep.dist is None or ep.dist.metadata["Name"] not in OURS
            }
        )
    )


FOREIGN_PLUGINS = _foreign_plugins()


def disable_plugins(*names: str) -> str:
    """A value for TPU_REGISTRY_DISABLE_PLUGINS that also keeps foreign plugins out."""
    return ",".join((*names, *FOREIGN_PLUGINS))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    if FOREIGN_PLUGINS:
        monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", disable_plugins())
    # No sysfs of the machine: detection reads an empty tree unless a test builds one.
    monkeypatch.setenv("TPU_REGISTRY_SYSFS_ROOT", "/nonexistent-sysfs-root")
    # A loaded CI machine must not turn a slow thread start into a detector time-out; tests
    # of the time budget pass their own.
    monkeypatch.setenv("TPU_REGISTRY_DETECT_TIMEOUT", "30")
    # Third-party plugins installed in the test venv (the GCE example) stay opt-in.
    from tpu_registry.resolution import clear_cache

    clear_cache()
    yield
    clear_cache()


def cli_path() -> str:
    return str(Path(sys.executable).parent / "tpu-registry")


# The attention shape most CLI tests resolve (Llama-3.1-8B's: 32 q heads, 8 KV heads, dim 128).
SHAPE = ("--heads", "32", "--kv-heads", "8", "--head-dim", "128")


def run_cli(
    *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would."""
    full_env = {k: v for k, v in os.environ.items()}
    full_env.update(env or {})
    return subprocess.run(
        [cli_path(), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120
    )


def make_sysfs(
    root: Path, devices: list[tuple[int, int, int | None]], dev_nodes: list[str] = ()
) -> Path:
    """A fake sysfs tree: one PCI function per (vendor, device, subsystem_device)."""
    base = root / "sys" / "bus" / "pci" / "devices"
    base.mkdir(parents=True, exist_ok=True)
    for i, (vendor, device, subsystem) in enumerate(devices):
        d = base / f"0000:00:{i + 4:02x}.0"
        d.mkdir()
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")
        if subsystem is not None:
            (d / "subsystem_device").write_text(f"0x{subsystem:04x}\n")
    for node in dev_nodes:
        p = root / "dev" / node
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    return root
