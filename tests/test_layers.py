"""The import-layer contracts of pyproject.toml hold, fail when broken, and place every module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from tpu_registry.tomlfile import tomllib

LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    paths = [
        str(root),
        str(root / "plugins" / "tpu-registry-gce"),
        str(root / "plugins" / "tpu-registry-vllm"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [LINT, "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "tpu_registry", root / "tpu_registry", ignore=ignore)
    for plugin in ("tpu-registry-gce", "tpu-registry-vllm"):
        shutil.copytree(REPO / "plugins" / plugin, root / "plugins" / plugin, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 2 kept, 0 broken." in r.stdout


def test_every_module_of_the_package_has_a_layer():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    [layers] = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    modules = {p.stem for p in (REPO / "tpu_registry").glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in (REPO / "tpu_registry").iterdir() if (p / "__init__.py").is_file()}
    assert modules == placed


def test_a_lower_module_importing_a_higher_one_breaks_the_layers(tmp_path):
    root = _copy(tmp_path)
    units = root / "tpu_registry" / "units.py"
    units.write_text(
        units.read_text() + "\n\ndef _cli():\n    from . import cli\n\n    return cli\n"
    )
    r = _lint(root)
    assert r.returncode == 1
    assert "The flow: each module imports only modules below it BROKEN" in r.stdout
    assert "tpu_registry.units -> tpu_registry.cli" in r.stdout


def test_a_plugin_importing_an_internal_module_breaks_the_public_api_contract(tmp_path):
    root = _copy(tmp_path)
    gce = root / "plugins" / "tpu-registry-gce" / "tpu_registry_gce" / "__init__.py"
    gce.write_text(
        gce.read_text().replace(
            "import tpu_registry\n",
            "import tpu_registry\nfrom tpu_registry.detection import reconcile  # noqa: F401\n",
            1,
        )
    )
    r = _lint(root)
    assert r.returncode == 1
    assert "Plugins and adapters import only the public package BROKEN" in r.stdout
    assert "tpu_registry_gce -> tpu_registry.detection" in r.stdout
